"""The web console's API, in-process and fast: a real server (gRPC + console in one event
loop, real SQLite file), a scripted worker on the real Workers stream, real HTTP."""
from __future__ import annotations

import threading
import time

import pytest

from trainctl.client import Client
from trainctl.server.auth import Tokens
from trainctl.v1 import trainctl_pb2 as pb

from .conftest import digits_spec
from .console_helpers import InProcServer, ScriptedWorker, SseReader, http

pytest_plugins = ["tests.pg"]  # pg_url: a throwaway PostgreSQL server (skips, saying why, without one)
TOKEN, WORKER_TOKEN = "client-secret", "worker-secret"


@pytest.fixture
def srv(tmp_path):
    s = InProcServer(tmp_path)
    yield s
    s.stop()


def _running(srv, worker_id="w1"):
    w = ScriptedWorker(srv.address, worker_id)
    with Client(srv.address) as c:
        x = c.submit(digits_spec("console-run"))
    a = w.take_run()
    assert a.experiment_id == x.id
    return w, a


def test_runs_list_and_live_board(srv):
    w, a = _running(srv)
    try:
        code, first = http(f"{srv.url}/api/runs")
        assert code == 200
        assert [r["id"] for r in first["runs"]] == [a.experiment_id]
        sse = SseReader(f"{srv.url}/api/runs/stream?version={first['version']}")
        w.steps(a, 0, 10, lr=0.05)
        got = sse.until(lambda m: m["t"] == "runs" and any(r["m"].get("step") == 9 for r in m["runs"]))
        row = next(r for r in got[-1]["runs"] if r["id"] == a.experiment_id)
        assert row["m"]["lr"] == 0.05 and row["m"]["loss"] == pytest.approx(2.0 / 10)
        # A state change reaches the table through the hub too.
        w.send(state=pb.StateUpdate(experiment_id=a.experiment_id, attempt=a.attempt, state=pb.COMPLETED))
        sse.until(lambda m: any((r["x"] or {}).get("state") == "COMPLETED" for r in m.get("runs", [])))
        sse.close()
    finally:
        w.close()


def test_runs_filter_by_state_and_tag(srv):
    with Client(srv.address) as c:
        a = c.submit(digits_spec("a"))
        b = c.submit(digits_spec("b"))
        c.annotate(b.id, add_tags=["baseline"])
    assert [r["id"] for r in http(f"{srv.url}/api/runs?tag=baseline")[1]["runs"]] == [b.id]
    assert {r["id"] for r in http(f"{srv.url}/api/runs?state=QUEUED")[1]["runs"]} == {a.id, b.id}
    code, err = http(f"{srv.url}/api/runs?state=BOGUS")
    assert code == 400 and err["error"] == "INVALID_ARGUMENT" and "state" in err["message"]
    code, err = http(f"{srv.url}/api/runs?tag=bad%20tag")
    assert code == 400 and "tags[0]" in err["message"]


def test_run_stream_history_then_live_no_gap_no_duplicate(srv):
    w, a = _running(srv)
    try:
        w.steps(a, 0, 50)
        _wait_points(srv, a.experiment_id, 100)
        sse = SseReader(f"{srv.url}/api/experiments/{a.experiment_id}/stream?points=2000")
        got = sse.until(lambda m: m["t"] == "history")
        assert got[0]["t"] == "experiment" and got[0]["experiment"]["spec"]["name"] == "console-run"
        hist = got[-1]
        assert hist["series"]["STEP"]["loss"]["steps"] == list(range(50))
        assert hist["last"]["STEP"] == 49 and len(hist["wall"]) > 0
        w.steps(a, 40, 20)  # a resend overlapping the history (steps 40..49) plus 50..59
        live = sse.until(lambda m: m["t"] == "metrics" and m["rows"][-1][0] == 59)
        steps = [r[0] for m in live if m["t"] == "metrics" for r in m["rows"]]
        assert steps == list(range(50, 60))
        sse.close()
    finally:
        w.close()


def test_history_of_a_long_run_is_downsampled_from_the_rollup(srv):
    w, a = _running(srv)
    try:
        for first in range(0, 20_000, 5_000):
            w.steps(a, first, 5_000)
        _wait_points(srv, a.experiment_id, 40_000)
        code, hist = http(f"{srv.url}/api/experiments/{a.experiment_id}/history?points=500")
        assert code == 200 and hist["total_points"] == 40_000
        loss = hist["series"]["STEP"]["loss"]
        assert len(loss["steps"]) <= 500 and loss["steps"][0] == 0 and loss["steps"][-1] == 19_999
        assert max(v for v in loss["values"]) == 2.0  # the max survives downsampling
        code, err = http(f"{srv.url}/api/experiments/{a.experiment_id}/history?points=0")
        assert code == 400 and "points" in err["message"]
    finally:
        w.close()


def test_control_from_console_goes_through_control_path_with_source_console(srv):
    w, a = _running(srv)
    try:
        w.steps(a, 0, 5)
        sse = SseReader(f"{srv.url}/api/experiments/{a.experiment_id}/stream")
        sse.until(lambda m: m["t"] == "history")
        answer = {}
        t = threading.Thread(target=lambda: answer.update(r=http(
            f"{srv.url}/api/experiments/{a.experiment_id}/control", {"kind": "SET_LR", "value": 0.01})))
        t.start()
        cmd = w.expect("control")
        assert cmd.kind == pb.SET_LR and cmd.value == 0.01
        w.send(ack=pb.ControlAck(experiment_id=a.experiment_id, attempt=a.attempt, command_id=cmd.command_id,
                                 ok=True, applied_step=5, old_value=0.1, new_value=0.01))
        t.join(15)
        code, rec = answer["r"]
        assert code == 200, rec
        assert (rec["status"], rec["applied_step"], rec["old_value"], rec["new_value"]) == ("APPLIED", 5, 0.1, 0.01)
        assert rec["source"] == "CONSOLE"
        # The same record is in the store (what `trainctl get` shows) and on the stream.
        with Client(srv.address) as c:
            stored = [r for r in c.controls(a.experiment_id) if r.command_id == cmd.command_id]
        assert stored and stored[0].source == "CONSOLE" and stored[0].applied_step == 5
        ev = sse.until(lambda m: m["t"] == "control")[-1]
        assert ev["control"]["command_id"] == cmd.command_id and ev["control"]["applied_step"] == 5
        sse.close()
    finally:
        w.close()


@pytest.mark.parametrize("body, field", [
    ({"kind": "SET_LR"}, "value"),
    ({"kind": "NOPE", "value": 1}, "kind"),
    ({"kind": "SET_LR", "value": "x"}, "value"),
    ({"kind": "SET_LR", "value": -1.0}, "value"),
])
def test_bad_control_input_is_400_naming_the_field(srv, body, field):
    with Client(srv.address) as c:
        x = c.submit(digits_spec("bad"))
    code, err = http(f"{srv.url}/api/experiments/{x.id}/control", body)
    assert code == 400 and err["error"] == "INVALID_ARGUMENT" and err["message"].startswith(field), err


def test_writes_need_json_and_same_origin(srv):
    with Client(srv.address) as c:
        x = c.submit(digits_spec("csrf"))
    url = f"{srv.url}/api/experiments/{x.id}/cancel"
    # A cross-site form post (text/plain, no preflight) is refused and changes nothing.
    code, err = http(url, {"reason": "x"}, headers={"content-type": "text/plain"})
    assert code == 400 and "application/json" in err["message"]
    code, err = http(url, {"reason": "x"}, headers={"origin": "http://evil.example"})
    assert code == 403 and err["error"] == "PERMISSION_DENIED"
    with Client(srv.address) as c:
        assert c.get(x.id).state == "QUEUED"
    code, body = http(url, {"reason": "from test"})
    assert code == 200 and body["state"] == "CANCELLED"


def test_annotate_tags_and_note(srv):
    with Client(srv.address) as c:
        x = c.submit(digits_spec("notes"))
    url = f"{srv.url}/api/experiments/{x.id}/annotate"
    code, body = http(url, {"add_tags": ["b", "a", "b"], "note": "first try"})
    assert code == 200 and body["tags"] == ["a", "b"] and body["note"] == "first try"
    code, body = http(url, {"remove_tags": ["a"]})
    assert body["tags"] == ["b"] and body["note"] == "first try"  # note kept when not sent
    code, err = http(url, {"add_tags": ["has space"]})
    assert code == 400 and err["message"].startswith("add_tags[0]")
    code, err = http(url, {"note": "x" * 10_001})
    assert code == 400 and err["message"].startswith("note")
    with Client(srv.address) as c:
        got = c.get(x.id)
        assert list(got.tags) == ["b"] and got.note == "first try"
        assert [y.id for y in c.list(tags=["b"])] == [x.id]
    code, err = http(f"{srv.url}/api/experiments/999/annotate", {"note": "x"})
    assert code == 404


def test_workers_page_data(srv):
    w, a = _running(srv, "gpu-box-1")
    try:
        code, body = http(f"{srv.url}/api/workers")
        assert code == 200
        (info,) = body["workers"]
        assert info["worker_id"] == "gpu-box-1" and info["connected"] and info["experiment_id"] == a.experiment_id
        assert info["devices"] == [{"kind": "cpu", "index": 0, "name": "test cpu", "memory_bytes": 8 << 30}]
    finally:
        w.close()


def test_unknown_experiment_and_route(srv):
    assert http(f"{srv.url}/api/experiments/12345")[0] == 404
    code, err = http(f"{srv.url}/api/nothing-here")
    assert code == 404 and err["error"] == "NOT_FOUND"
    code, err = http(f"{srv.url}/api/experiments/abc")
    assert code == 400 and err["message"].startswith("id")


def test_static_files_are_served_without_internet():
    import re

    from trainctl.server.console.app import STATIC

    html = (STATIC / "index.html").read_text()
    for src in re.findall(r'(?:src|href)="([^"#]+)"', html):
        if src.startswith("data:"):  # inline (the empty favicon)
            continue
        assert src.startswith("/static/"), f"{src}: the console must load nothing from elsewhere"
        assert (STATIC / src[len("/static/"):]).is_file()
    assert (STATIC / "uPlot.LICENSE").read_text().startswith("The MIT License")


# ---------------------------------------------------------------------- auth


@pytest.fixture
def secured(tmp_path):
    s = InProcServer(tmp_path, tokens=Tokens(client=(TOKEN,), worker=(WORKER_TOKEN,)))
    yield s
    s.stop()


def test_tokens_as_header_same_roles_as_grpc(secured):
    url = f"{secured.url}/api/runs"
    assert http(f"{secured.url}/api/config")[1]["auth"] is True  # open: the page asks for a token
    code, err = http(url)
    assert code == 401 and err["error"] == "UNAUTHENTICATED" and "token" in err["message"]
    code, err = http(url, token="wrong")
    assert code == 401 and "invalid token" in err["message"]
    code, err = http(url, token=WORKER_TOKEN)
    assert code == 403 and err["error"] == "PERMISSION_DENIED"
    # A cookie is never a credential.
    code, _ = http(url, headers={"cookie": f"token={TOKEN}; authorization=Bearer {TOKEN}"})
    assert code == 401
    code, body = http(url, token=TOKEN)
    assert code == 200 and body["runs"] == []


def test_console_refuses_non_loopback_without_auth(tmp_path):
    import asyncio

    from trainctl.server.console import Console

    async def go():
        await Console.start("0.0.0.0:0", service=None, live=None, dispatcher=None, tokens=Tokens())

    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(go())


def _wait_points(srv, id: int, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, hist = http(f"{srv.url}/api/experiments/{id}/history?points=10")
        if code == 200 and hist["total_points"] >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"experiment {id} never reached {n} points")


# ---------------------------------------------------------------------- CLI verbs and RPCs


def test_cli_tag_note_ls_tag_and_compare(srv, capsys):
    import json

    from trainctl.client.cli import main

    with Client(srv.address) as c:
        a = c.submit(digits_spec("cmp-a"))
        b = c.submit(digits_spec("cmp-b", epochs=5))
    s = ["--server", srv.address]
    assert main(["tag", str(a.id), "+baseline", "+cosine", *s]) == 0
    assert main(["tag", str(a.id), "-cosine", "+v2", "--json", *s]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"id": a.id, "tags": ["baseline", "v2"]}
    assert main(["note", str(b.id), "more epochs", "--json", *s]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": b.id, "note": "more epochs"}
    assert main(["ls", "--tag", "baseline", "--json", *s]) == 0
    assert [x["id"] for x in json.loads(capsys.readouterr().out)] == [a.id]
    assert main(["compare", str(a.id), str(b.id), "--json", *s]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in out["experiments"]] == [a.id, b.id]
    assert out["spec_differences"] == {"train.epochs": [3, 5]}
    assert main(["compare", str(a.id), str(b.id), *s]) == 0
    assert "train.epochs" in capsys.readouterr().out
    # A bad tag is refused naming the field, with the gRPC status.
    assert main(["tag", str(a.id), "+no spaces allowed", *s]) == 2
    assert "INVALID_ARGUMENT: add_tags[0]" in capsys.readouterr().err


def test_annotate_and_list_workers_rpcs(srv):
    import grpc

    from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

    w = ScriptedWorker(srv.address, "rpc-worker")
    try:
        with Client(srv.address) as c:
            x = c.submit(digits_spec("rpc"))
        w.take_run()
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ExperimentsStub(ch)
            got = stub.Annotate(pb.AnnotateRequest(id=x.id, add_tags=["a"], note="n"))
            assert list(got.tags) == ["a"] and got.note == "n"
            got = stub.Annotate(pb.AnnotateRequest(id=x.id, remove_tags=["a"]))  # note unset: kept
            assert list(got.tags) == [] and got.note == "n"
            with pytest.raises(grpc.RpcError) as err:
                stub.Annotate(pb.AnnotateRequest(id=999, note="x"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as err:
                stub.Annotate(pb.AnnotateRequest(id=x.id, add_tags=["x" * 65]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "add_tags[0]" in err.value.details()
            (info,) = stub.ListWorkers(pb.ListWorkersRequest()).workers
            assert (info.worker_id, info.hostname, info.connected, info.experiment_id) == \
                ("rpc-worker", "test-host", True, x.id)
            assert [d.name for d in info.devices] == ["test cpu"]
    finally:
        w.close()


# ---------------------------------------------------------------------- migration 0004


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0004_adds_tags_and_note_to_existing_experiments(tmp_path, request, backend):
    from alembic import command
    from sqlalchemy import create_engine, text

    from trainctl.server.store import open_store
    from trainctl.server.store.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    command.upgrade(alembic_config(url), "0003")  # a database written before tags and notes
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO experiments (name, state, spec, created_at, attempt, message, summary, last_step, "
            "max_restarts, restarts, gpus) VALUES ('old', 'COMPLETED', '{}', 0, 1, '', '{}', 0, 3, 0, 0)"))
    engine.dispose()
    with open_store(url) as s:  # upgrades to head
        (x,) = s.list_experiments()
        assert (x.tags, x.note) == ((), "")
        y = s.annotate(x.id, add_tags=["kept"], note="after the upgrade")
        assert (y.tags, y.note) == (("kept",), "after the upgrade")
        assert [e.id for e in s.list_experiments(tags=["kept"])] == [x.id]
    command.downgrade(alembic_config(url), "0003")  # and back: the old schema again
    command.upgrade(alembic_config(url), "head")


def test_plot_overlays_several_runs_with_their_controls(srv, tmp_path, capsys):
    import json

    from trainctl.client.cli import main

    w = ScriptedWorker(srv.address, "plot-worker")
    try:
        ids = []
        for name in ("p1", "p2"):
            with Client(srv.address) as c:
                ids.append(c.submit(digits_spec(name)).id)
            a = w.take_run()
            w.steps(a, 0, 20, lr=0.1 if name == "p1" else 0.05)
            w.send(state=pb.StateUpdate(experiment_id=a.experiment_id, attempt=a.attempt, state=pb.COMPLETED))
            _wait_points(srv, a.experiment_id, 40)
        png = tmp_path / "overlay.png"
        assert main(["plot", *map(str, ids), "--png", str(png), "--json", "--server", srv.address]) == 0
        drawn = json.loads(capsys.readouterr().out)
        assert drawn["experiments"] == ids and drawn["series"] == ["STEP/lr", "STEP/loss"]
        assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    finally:
        w.close()


def test_dns_rebinding_guard_with_auth_off(srv):
    # A page served as http://evil.example:PORT resolving to 127.0.0.1: same-origin to the
    # browser, but the Host is not a loopback name, so the console refuses it.
    code, err = http(f"{srv.url}/api/runs", headers={"host": "evil.example"})
    assert code == 403 and "loopback" in err["message"]
    assert http(f"{srv.url}/api/runs", headers={"host": "localhost:1234"})[0] == 200
