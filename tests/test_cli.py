"""The `trainctl` CLI as people and scripts use it, against a real server.

One cluster for the module: a finished two-epoch run with a live command (sent while
queued, applied at step 0) and a scheduled one at step 4; then the worker stops, a
queued run and a replay wait. Commands run in-process (`main`, stdout captured) or as
real subprocesses where the process boundary is the point (pipes, stdout purity).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from datetime import datetime

import pytest
from rich.console import Console

from tests.conftest import Cluster, digits_spec
from trainctl.client.cli import main

pytestmark = pytest.mark.slow

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cli"))
    try:
        with c.client() as cl:
            done = cl.submit(digits_spec("cli-done", epochs=2, max_steps=3,
                                         control=[{"at_step": 4, "scale_lr": 0.5}]))
            assert cl.set_lr(done.id, 0.02, wait=0).status == "PENDING"
            c.add_worker("w0")
            try:
                assert cl.wait(done.id, timeout=300).state == "COMPLETED", c.logs()
            except TimeoutError:
                raise AssertionError(c.logs()) from None
            c.workers[0].stop()
            queued = cl.submit(digits_spec("cli-queued", epochs=2, max_steps=3))
            replay = cl.replay(done.id)
        yield c, done.id, queued.id, replay.id
    finally:
        c.stop()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_cli(c: Cluster, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainctl.client.cli", *args, "-s", c.address],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, **kw)


@pytest.fixture
def wide(monkeypatch):
    from trainctl.client import render

    monkeypatch.setattr(render, "console", Console(highlight=False, width=200, force_terminal=True,
                                                   color_system=None))


# ---------------------------------------------------------------------- 3: text watch of a finished run
def test_text_watch_of_a_finished_run_shows_history_in_step_order(runs, capsys):
    c, done, _, _ = runs
    rc, out, _ = cli(capsys, "watch", str(done), "-s", c.address)
    assert rc == 0
    lines = out.splitlines()
    epoch_lines = [i for i, ln in enumerate(lines) if ln.startswith("epoch ")]
    assert [lines[i].split()[1] for i in epoch_lines] == ["1", "2"], out  # the history is shown
    ctl = [i for i, ln in enumerate(lines) if ln.startswith("control ")]
    assert len(ctl) == 2, out
    # controls in step order among the epoch lines: SET_LR at step 0 first, SCALE_LR at 4
    # (after epoch 1 ends at step 3, before epoch 2)
    assert "SET_LR 0.02 applied at step 0" in lines[ctl[0]] and ctl[0] < epoch_lines[0]
    assert "SCALE_LR 0.5 applied at step 4" in lines[ctl[1]] and epoch_lines[0] < ctl[1] < epoch_lines[1]
    # the bar knows its total (6 steps) and ends full
    assert re.search(r"COMPLETED.*6/6", out), out
    assert "COMPLETED" in lines[-1]


def test_watch_bar_clock_counts_from_the_run_start():
    from trainctl.client.render import live_view
    from trainctl.client.sdk import ExperimentInfo

    x = ExperimentInfo(id=1, name="n", state="COMPLETED", spec={}, attempt=1, worker_id="w", message="",
                       summary={"steps": 4}, last_step=4, created_at=1.0, started_at=1000.0, finished_at=1125.0,
                       replay_of=0)
    con = Console(width=120, record=True, color_system=None, force_terminal=True)
    from trainctl.client import render

    saved, render.console = render.console, con
    try:
        live_view(iter(()), epochs=1, experiment=x)
    finally:
        render.console = saved
    assert "0:02:05" in con.export_text()  # finished - started, not the watch's own second


# ---------------------------------------------------------------------- 4: pure JSON
def test_every_json_output_is_json_only(runs):
    c, done, queued, _ = runs
    for args in (["ls", "--json"], ["get", str(done), "--json"], ["metrics", str(done), "--json"],
                 ["top", "--json"], ["cancel", str(done), "--json"]):
        r = run_cli(c, *args)
        assert r.returncode == 0, (args, r.stderr)
        json.loads(r.stdout)
    r = run_cli(c, "watch", str(done), "--json")
    assert r.returncode == 0 and all(json.loads(ln) for ln in r.stdout.splitlines())
    # submit --follow --json: the "submitted" message goes to stderr, stdout is JSON lines
    spec = c.tmp / "q.json"
    spec.write_text(json.dumps(digits_spec("cli-follow", epochs=1, max_steps=2)))
    p = subprocess.Popen([sys.executable, "-m", "trainctl.client.cli", "submit", str(spec), "--follow", "--json",
                          "-s", c.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()
        assert json.loads(first)["event"] == "experiment"
    finally:
        p.kill()
        _, err = p.communicate(timeout=30)
    assert "submitted experiment" in err


# ---------------------------------------------------------------------- 5, 6: epochs and types
def test_one_epoch_convention_and_integers_stay_integers(runs, capsys, wide):
    c, done, _, _ = runs
    rc, out, _ = cli(capsys, "get", str(done), "--json", "-s", c.address)
    x = json.loads(out)
    assert x["spec"]["train"]["epochs"] == 2 and isinstance(x["spec"]["train"]["epochs"], int)
    assert isinstance(x["spec"]["data"]["batch_size"], int)
    assert isinstance(x["summary"]["steps"], int) and x["summary"]["steps"] == 6
    assert x["summary"]["best_epoch"] in (1, 2)  # epoch numbers, 1-based
    for k in ("created_at", "started_at", "finished_at"):
        assert ISO.match(x[k]), x[k]
    assert all(ISO.match(r["requested_at"]) for r in x["controls"])
    rc, text, _ = cli(capsys, "get", str(done), "-s", c.address)
    assert f"best_epoch={x['summary']['best_epoch']}" in text

    rc, out, _ = cli(capsys, "top", str(done), "--json", "-s", c.address)
    (row,) = json.loads(out)
    assert row["epoch"] == 2 and row["epochs"] == 2
    rc, out, _ = cli(capsys, "top", str(done), "--once", "-s", c.address)
    assert "ep 2/2" in out

    rc, out, _ = cli(capsys, "watch", str(done), "--json", "-s", c.address)
    evs = [json.loads(ln) for ln in out.splitlines()]
    assert [e["epoch"] for e in evs if e["event"] == "epoch"] == [1, 2]
    assert {e["epoch"] for e in evs if e["event"] == "step"} == {1, 2}
    assert all(ISO.match(e["wall_time"]) for e in evs if e["event"] in ("step", "epoch"))

    rc, out, _ = cli(capsys, "metrics", str(done), "--json", "-s", c.address)
    m = json.loads(out)
    assert set(m) == {"step", "epoch"} and "loss" in m["step"] and "val_top1" in m["epoch"]
    assert m["epoch"]["val_top1"]["epoch"] == [1, 2] and m["step"]["loss"]["step"] == list(range(6))
    assert m["epoch"]["best_epoch"]["value"][-1] == x["summary"]["best_epoch"]  # a number, like the summary's


# ---------------------------------------------------------------------- 7: tables fit
def test_tables_fit_the_terminal_and_pipes_get_full_values(runs, capsys, monkeypatch):
    c, done, queued, _ = runs
    from trainctl.client import render

    for width in (60, 80):
        monkeypatch.setattr(render, "console", Console(highlight=False, width=width, force_terminal=True,
                                                       color_system=None))
        for args in (["ls"], ["metrics", str(done)], ["top", "--once", str(done), str(queued)], ["get", str(done)]):
            rc, out, _ = cli(capsys, *args, "-s", c.address)
            assert rc == 0
            lines = out.splitlines()
            assert all(len(ln) <= width for ln in lines), (args, width, out)
            if args[0] == "ls":  # one line per row: nothing wraps; whole columns dropped, no value cut
                rows = [ln for ln in lines if "cli-" in ln]
                assert len(rows) >= 3 and all(re.search(r"COMPLETED|QUEUED|CANCELLED", ln) for ln in rows), out
                assert "…" not in out
            if args[0] == "metrics":
                assert "epoch/val_top1" in out and "…" not in out
            if args[0] == "top":
                assert "COMPLETED" in out and "QUEUED" in out and "RUNNI…" not in out
    # a pipe: every column, every value in full, one line per row
    r = run_cli(c, "ls")
    rows = [ln for ln in r.stdout.splitlines() if "cli-" in ln]
    assert len(rows) >= 3 and all(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", ln) for ln in rows), r.stdout
    assert "WORKER" in r.stdout and "w0" in r.stdout
    r = run_cli(c, "metrics", str(done))
    assert "epoch/val_top1" in r.stdout and "…" not in r.stdout


# ---------------------------------------------------------------------- 8: wall times
def test_metrics_csv_has_each_points_wall_time(runs, capsys):
    c, done, _, _ = runs
    rc, out, _ = cli(capsys, "metrics", str(done), "--csv", "-s", c.address)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and set(rows[0]) == {"scope", "name", "step", "epoch", "wall_time", "value"}
    with c.client() as cl:
        stored = {(e.kind, e.step): e.wall_time for e in cl.history(done) if e.kind in ("step", "epoch")}
    times = {(r["scope"], int(r["step"])): datetime.fromisoformat(r["wall_time"].replace("Z", "+00:00")).timestamp()
             for r in rows}
    assert set(times) == set(stored)
    assert all(abs(times[k] - stored[k]) < 1e-5 for k in stored)
    assert len({round(t, 3) for t in times.values()}) > 3  # real, distinct times


def test_export_tb_writes_each_points_real_wall_time(runs, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    c, done, _, _ = runs
    rc, out, _ = cli(capsys, "export-tb", str(done), "--logdir", str(tmp_path), "--json", "-s", c.address)
    assert rc == 0
    acc = EventAccumulator(json.loads(out)["logdir"], size_guidance={SCALARS: 0})
    acc.Reload()
    with c.client() as cl:
        stored = {(e.kind, e.step): e.wall_time for e in cl.history(done) if e.kind in ("step", "epoch")}
    got = {("step", e.step): e.wall_time for e in acc.Scalars("step/loss")}
    assert got == pytest.approx({k: v for k, v in stored.items() if k[0] == "step"})
    assert len(set(got.values())) == len(got)


# ---------------------------------------------------------------------- 9: say what exists
def test_unknown_metric_names_and_empty_export_are_errors(runs, capsys, tmp_path):
    c, done, queued, _ = runs
    rc, out, err = cli(capsys, "metrics", str(done), "--names", "loss,nonexistent", "-s", c.address)
    assert rc == 2 and out == ""
    assert "nonexistent" in err and "step/loss" in err and "epoch/val_top1" in err
    rc, out, err = cli(capsys, "export-tb", str(queued), "--logdir", str(tmp_path / "tb"), "-s", c.address)
    assert rc == 1 and "nothing to export" in err
    assert not (tmp_path / "tb").exists()


# ---------------------------------------------------------------------- 10: closed pipe
def test_closed_pipe_exits_quietly(runs):
    c, _, _, _ = runs
    with c.client() as cl:
        for i in range(40):  # enough output to outgrow the pipe buffer
            cl.submit(digits_spec(f"cli-pipe-{i}-" + "x" * 100, epochs=1, max_steps=1))
    with c.client() as cl:  # ls pages through everything (List pages are 100 by default)
        ids = [x.id for x in cl.list()]
        assert [x.id for x in cl.list(page_size=7)] == ids and len(ids) == len(set(ids)) >= 43
        assert [x.id for x in cl.list(limit=10, page_size=3)] == ids[:10]
    r = run_cli(c, "ls", "--json")
    assert [x["id"] for x in json.loads(r.stdout)] == ids
    p = subprocess.run(f"{sys.executable} -m trainctl.client.cli ls --json -s {c.address} | head -c 10",
                       shell=True, capture_output=True, text=True, timeout=120,
                       executable="/bin/bash")
    assert len(p.stdout) == 10
    assert p.stderr == "", p.stderr
    r = subprocess.run(["bash", "-c", "set -o pipefail; " + f"{sys.executable} -m trainctl.client.cli ls --json "
                        f"-s {c.address} | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() in ("0", "141") and r.stderr == ""
    with c.client() as cl:  # leave the module's runs as they were
        for x in cl.list():
            if x.name.startswith("cli-pipe-"):
                cl.cancel(x.id)


# ---------------------------------------------------------------------- 11, 12
def test_second_cancel_is_not_an_error(runs, capsys):
    c, done, _, _ = runs
    with c.client() as cl:
        x = cl.submit(digits_spec("cli-cancel", epochs=1, max_steps=1))
    rc, out, _ = cli(capsys, "cancel", str(x.id), "-s", c.address)
    assert rc == 0 and "CANCELLED" in out
    rc, out, err = cli(capsys, "cancel", str(x.id), "-s", c.address)
    assert rc == 0 and "CANCELLED" in out and err == ""
    rc, out, err = cli(capsys, "cancel", str(done), "-s", c.address)
    assert rc == 0 and "COMPLETED" in out and "already ended" in out


def test_get_shows_what_a_replay_replays(runs, capsys, wide):
    c, done, _, replay = runs
    rc, out, _ = cli(capsys, "get", str(replay), "-s", c.address)
    assert rc == 0 and f"replay of #{done}" in out
    rc, out, _ = cli(capsys, "get", str(replay), "--json", "-s", c.address)
    assert json.loads(out)["replay_of"] == done


# ---------------------------------------------------------------------- 14: plaintext vs TLS
def test_tls_hint_on_a_closed_plaintext_connection(monkeypatch):
    from trainctl.transport import tls_hint

    monkeypatch.delenv("TRAINCTL_TLS_CA", raising=False)
    assert "TLS" in tls_hint("UNAVAILABLE", "Socket closed")
    assert tls_hint("UNAVAILABLE", "failed to connect to all addresses; Connection refused") == ""
    monkeypatch.setenv("TRAINCTL_TLS_CA", "/x")
    assert tls_hint("UNAVAILABLE", "Socket closed") == ""
