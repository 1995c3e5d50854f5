"""Tools people already use: the Prometheus endpoint, TensorBoard export, `trainctl top`.

One cluster for the module: a server with --metrics-port, one finished run (a live
set_lr sent while it was queued, so it is delivered with the assignment) and one run
left queued after the worker stopped.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from tests.conftest import Cluster, digits_spec, free_port
from trainctl.client.cli import main
from trainctl.client.dashboard import RunState, follow, row_cells, runs_table, snapshot
from trainctl.client.sdk import ControlResult, Event, ExperimentInfo


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    metrics_port = free_port()
    c = Cluster(tmp_path_factory.mktemp("tools"), ["--metrics-port", str(metrics_port)])
    try:
        with c.client() as cl:
            done = cl.submit(digits_spec("prom", epochs=1, max_steps=3))
            pending = cl.set_lr(done.id, 0.02, wait=0)
            assert pending.status == "PENDING"
            c.add_worker("w0")
            assert cl.wait(done.id, timeout=120).state == "COMPLETED", c.logs()
            with_worker = scrape(metrics_port)
            c.workers[0].stop()
            queued = cl.submit(digits_spec("queued", epochs=2, max_steps=3))
        yield c, metrics_port, done.id, queued.id, with_worker
    finally:
        c.stop()


# ---------------------------------------------------------------------- prometheus
def test_prometheus_endpoint_counts_what_the_store_holds(tools):
    c, port, done, queued, with_worker = tools
    m = scrape(port)
    with c.client() as cl:
        stored = sum(len(s["step"]) for s in cl.metrics(done).values())
        (ctl,) = [r for r in cl.controls(done) if r.source == "LIVE"]
    assert ctl.status == "APPLIED"
    assert stored > 0 and m[("trainctl_metric_points_ingested_total", ())] == stored
    assert m[("trainctl_metric_batches_ingested_total", ())] >= 2  # a step batch and an epoch batch at least
    assert m[("trainctl_control_latency_seconds_count", ())] == 1
    latency = m[("trainctl_control_latency_seconds_sum", ())]
    assert latency == pytest.approx(ctl.applied_at - ctl.requested_at, abs=1e-6) and latency > 0
    assert m[("trainctl_control_latency_seconds_bucket", (("le", "+Inf"),))] == 1
    states = {dict(k[1])["state"]: v for k, v in m.items() if k[0] == "trainctl_experiments"}
    assert states == {"QUEUED": 1, "ASSIGNED": 0, "RUNNING": 0, "COMPLETED": 1, "FAILED": 0, "CANCELLED": 0}
    assert with_worker[("trainctl_workers_connected", ())] == 1
    assert m[("trainctl_workers_connected", ())] == 0
    assert m[("trainctl_watch_subscribers", ())] == 0

    # an open Watch on the queued run shows as a subscriber, and goes when it closes
    cl = c.client()
    watching = threading.Thread(target=lambda: list(cl.watch(queued)), daemon=True)
    watching.start()
    assert _eventually(lambda: scrape(port)[("trainctl_watch_subscribers", ())] == 1)
    cl.close()
    watching.join(10)
    assert _eventually(lambda: scrape(port)[("trainctl_watch_subscribers", ())] == 0)


def _eventually(pred, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_metrics_endpoints_are_per_server_and_stop_with_it(tmp_path):
    from trainctl.server.app import ServerConfig, create_server

    async def run():
        servers = []
        for i in range(2):  # own registries: a second server in the process must not clash
            s, _ = create_server("127.0.0.1:0", ServerConfig(db_url=f"sqlite:///{tmp_path}/{i}.db", metrics_port=0))
            await s.start()
            servers.append(s)
        ports = [s.metrics.port for s in servers]
        first = await asyncio.to_thread(scrape, ports[0])  # the scrape visits the loop: not from it
        assert first[("trainctl_experiments", (("state", "QUEUED"),))] == 0
        assert first[("trainctl_metric_points_ingested_total", ())] == 0
        for s in servers:
            await s.stop(grace=0)
        return ports

    for port in asyncio.run(run()):
        with pytest.raises(urllib.error.URLError):
            scrape(port)


# ---------------------------------------------------------------------- tensorboard
def test_export_tb_round_trips_exactly(tools, tmp_path, capsys):
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator
    from tensorboard.util import tensor_util

    c, _, done, _, _ = tools
    assert main(["export-tb", str(done), "--logdir", str(tmp_path), "-s", c.address, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert main(["export-tb", str(done), "--logdir", str(tmp_path), "-s", c.address]) == 0  # replaces, not doubles
    assert len(list((tmp_path / f"{done}-prom").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(out["logdir"], size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    with c.client() as cl:
        series, controls = cl.metrics(done), cl.controls(done)
    tags = {f"{k.split('/')[0].lower()}/{k.split('/', 1)[1]}": v for k, v in series.items()}
    assert {"step/lr", "step/loss", "epoch/val_top1"} <= set(tags)
    assert set(acc.Tags()["scalars"]) == set(tags) and set(acc.Tags()["tensors"]) == {"spec", "controls"}
    for tag, s in tags.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == s["step"], tag
        # exactly the stored value as TensorBoard keeps scalars: rounded to float32
        assert [e.value for e in events] == [float(np.float32(v)) for v in s["value"]], tag
    (ctl,) = acc.Tensors("controls")
    (rec,) = [r for r in controls if r.source == "LIVE"]
    assert ctl.step == rec.applied_step
    text = tensor_util.make_ndarray(ctl.tensor_proto).item().decode()
    assert text.startswith("set_lr 0.02 (live) applied at step") and "-> 0.02" in text
    assert acc.SummaryMetadata("controls").plugin_data.plugin_name == "text"
    assert out["points"] == sum(len(s["step"]) for s in series.values()) and out["controls"] == 1


# ---------------------------------------------------------------------- top
def test_top_once_shows_finished_and_queued_runs(tools, capsys, monkeypatch):
    c, _, done, queued, _ = tools
    monkeypatch.setenv("COLUMNS", "200")
    from trainctl.client import render

    monkeypatch.setattr(render, "console", Console(highlight=False, width=200))
    assert main(["top", str(done), str(queued), "--once", "-s", c.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {name: next(ln for ln in lines if f" {name} " in ln) for name in ("prom", "queued")}
    assert "COMPLETED" in row["prom"] and "ep 1/1" in row["prom"] and "set_lr 0.02 @" in row["prom"]
    assert "QUEUED" in row["queued"] and "ep 0/2" in row["queued"]

    # no ids: the queued and running ones only
    assert main(["top", "--json", "-s", c.address]) == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["id"] == queued and only["state"] == "QUEUED" and only["progress"] == 0.0


def test_top_stream_state_equals_snapshot(tools):
    """What a Watch stream builds (the live view) is what the stored snapshot shows."""
    c, _, done, _, _ = tools
    with c.client() as cl:
        x = cl.get(done)
        snap = snapshot(cl, x)
        streamed = RunState.of(x)
        follow(cl, streamed, threading.Lock())
    assert streamed.to_json() == snap.to_json()
    assert snap.step == 2 and x.last_step == 3 and snap.steps_per_epoch == 3 and snap.progress() == 1.0
    assert snap.last_control.startswith("set_lr 0.02 @") and snap.val_top1 is not None


def _x(**kw) -> ExperimentInfo:
    base = dict(id=7, name="cosine-a", state="RUNNING", spec={"train": {"epochs": 4}}, attempt=1, worker_id="w0",
                message="", summary={}, last_step=0, created_at=None, started_at=None, finished_at=None, replay_of=0)
    return ExperimentInfo(**{**base, **kw})


def test_row_rendering():
    r = RunState.of(_x())
    for step in range(15):  # epoch 0 is steps 0-9 (its epoch row at step 10), epoch 1 is 10-19
        r.apply(Event("step", step=step, epoch=step // 10, values={"lr": 0.1 / (step + 1), "loss": 2.0 - step / 10}))
        if step == 9:
            r.apply(Event("epoch", step=10, epoch=0, values={"val_top1": 0.625, "val_loss": 1.0}))
    r.apply(Event("step", step=3, epoch=0, values={"lr": 9.0, "loss": 9.0}))  # a replayed row changes nothing
    late = ControlResult("c1", 7, "SET_LR", 0.02, "APPLIED", "LIVE", 12, 0.0077, 0.02, "", 1.0, 20.0, None)
    early = ControlResult("c0", 7, "SCALE_LR", 0.5, "APPLIED", "SCHEDULED", 5, 0.2, 0.1, "", 0.0, 10.0, 5)
    r.apply(Event("control", control=late))
    r.apply(Event("control", control=early))  # older: the stream replays the log first
    assert r.steps_per_epoch == 10 and r.progress() == pytest.approx(1.5 / 4)
    assert r.last_control == "set_lr 0.02 @12" and len(r.losses) == 15

    con = Console(width=200, record=True, color_system=None)
    con.print(runs_table([r]))
    text = con.export_text()
    header, row = [ln for ln in text.splitlines() if "ID" in ln or "cosine-a" in ln][:2]
    for col in ("ID", "NAME", "STATE", "PROGRESS", "LR", "LOSS", "VAL TOP-1", "LAST CONTROL"):
        assert col in header
    for piece in ("7", "cosine-a", "RUNNING", "ep 2/4", "step 14", "0.006667", "0.6000", "0.6250", "set_lr 0.02 @12"):
        assert piece in row, (piece, row)
    assert "█" in row and "▁" in row  # the loss sparkline (falling: high first)

    q = row_cells(RunState.of(_x(state="QUEUED")))
    assert [str(cell) for cell in (q[0], q[1], q[2], q[4], q[5], q[6], q[7])] == ["7", "cosine-a", "QUEUED", "-", "-",
                                                                                 "-", "-"]


def test_without_prometheus_client_counting_is_off_and_the_port_refused(monkeypatch):
    from trainctl.server import prometheus

    monkeypatch.setattr(prometheus, "prom", None)
    stats = prometheus.ServerStats()
    stats.ingested(5)  # no-ops, so the slim server image runs without the extra
    live = type("FakeLive", (), {"stats": stats})()
    with pytest.raises(ValueError, match=r"pip install 'trainctl\[metrics\]'"):
        prometheus.MetricsEndpoint.start("127.0.0.1", 0, live, None)
    assert prometheus.listen_host("[::]:50051") == "::" and prometheus.listen_host("0.0.0.0:1") == "0.0.0.0"
