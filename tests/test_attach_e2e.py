"""The attach SDK against real processes: a real server (SQLite file), the example
scripts run as subprocesses, steered with the real CLI; the server down at init and
killed mid-run. Each run must end COMPLETED with every step stored exactly once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Proc, free_port, wait_for, wait_healthy
from trainctl.client import Client

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _script(name: str, address: str, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TRAINCTL_SERVER": address, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRAINCTL_TOKEN", None)
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / "attach" / name), *args], env=env, cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _cli(address: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAINCTL_SERVER": address}
    return subprocess.run([sys.executable, "-m", "trainctl.client.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _running_run(client: Client, name: str, min_step: int):
    def find():
        for x in client.list():
            if x.name == name and x.last_step >= min_step:
                return x
        return None
    return find


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    rc = proc.wait(timeout)
    out = log.read_text()
    assert rc == 0, out
    assert "not delivered" not in out, out
    return out


def test_plain_loop_steered_from_the_cli(cluster, tmp_path):
    log = tmp_path / "loop.log"
    proc = _script("plain_loop.py", cluster.address, log, "--name", "steer-me", "--epochs", "8",
                   "--step-delay", "0.03")
    try:
        client = cluster.client()
        run = wait_for(_running_run(client, "steer-me", 10), 120, "the run never showed up")
        assert run.kind == "ATTACHED" and run.state in ("ASSIGNED", "RUNNING")
        r = _cli(cluster.address, "set-lr", str(run.id), "0.02")
        assert r.returncode == 0 and "applied at step" in r.stdout, r.stdout + r.stderr
        r = _cli(cluster.address, "set", str(run.id), "dropout", "0.3")
        assert r.returncode == 0 and "applied at step" in r.stdout, r.stdout + r.stderr
        r = _cli(cluster.address, "set", str(run.id), "dropout", "5")  # above its declared high
        assert r.returncode != 0 and "dropout" in (r.stdout + r.stderr), r.stdout + r.stderr
        for args in (["ls"], ["get", str(run.id)], ["metrics", str(run.id)]):
            r = _cli(cluster.address, *args)
            assert r.returncode == 0, (args, r.stdout + r.stderr)
            if args[0] == "get":  # the knob with its value and declared bounds
                assert "dropout=0.3 [" in r.stdout, r.stdout
        _finish(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
    x = client.get(run.id)
    assert x.state == "COMPLETED" and x.kind == "ATTACHED", x
    assert {k["name"]: k["value"] for k in x.knobs}.get("dropout") == 0.3, x.knobs
    recs = {c.kind: c for c in client.controls(run.id)}
    lr_cmd, knob_cmd = recs["SET_LR"], recs["SET_KNOB"]
    assert lr_cmd.status == knob_cmd.status == "APPLIED"
    assert lr_cmd.new_value == pytest.approx(0.02) and knob_cmd.old_value == 0.0 and knob_cmd.new_value == 0.3
    m = client.metrics(run.id)
    steps = 8 * 24  # 1500 training images / batch 64
    assert m["STEP/loss"]["step"] == list(range(steps))  # every step, once
    assert m["EPOCH/val_acc"]["epoch"] == list(range(8))
    # The LR at every step: MultiStepLR's own (0.1, x0.5 from step 96), then from the applied
    # step on that schedule x one constant (0.02 / the schedule's LR at that step).
    s = lr_cmd.applied_step
    sched = [0.1 * (0.5 if k >= 96 else 1.0) for k in range(steps)]
    want = [sched[k] if k < s else sched[k] * 0.02 / sched[s] for k in range(steps)]
    assert m["STEP/lr"]["step"] == list(range(steps))
    assert m["STEP/lr"]["value"] == pytest.approx(want, rel=1e-9)


def test_server_down_at_init_the_run_appears_later_with_every_point(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "sgd.log"
    proc = _script("noisy_sgd.py", address, log, "--name", "late", "--steps", "600", "--step-delay", "0.01")
    server = None
    try:
        time.sleep(3)  # the loop is running, nothing listens
        assert proc.poll() is None, log.read_text()
        server = Proc(["server", "--listen", address, "--db", f"sqlite:///{tmp_path / 'db.sqlite'}"],
                      tmp_path / "server.log")
        wait_healthy(address, server)
        _finish(proc, log)
        client = Client(address)
        (x,) = [e for e in client.list() if e.name == "late"]
        assert x.state == "COMPLETED", x
        m = client.metrics(x.id)
        assert m["STEP/loss"]["step"] == list(range(600))
    finally:
        if proc.poll() is None:
            proc.kill()
        if server is not None:
            server.stop()


def test_server_killed_mid_run_the_loop_keeps_going_nothing_lost(cluster, tmp_path):
    log = tmp_path / "sgd.log"
    proc = _script("noisy_sgd.py", cluster.address, log, "--name", "outage", "--steps", "1500",
                   "--step-delay", "0.01")
    try:
        client = cluster.client()
        run = wait_for(_running_run(client, "outage", 50), 120, "the run never showed up")
        cluster.server.stop(signal.SIGKILL)
        killed_at = time.time()
        time.sleep(4)
        assert proc.poll() is None, log.read_text()
        cluster.start_server()
        back_at = time.time()
        _finish(proc, log)
        client = cluster.client()
        x = client.get(run.id)
        assert x.state == "COMPLETED", x
        rows = [e for e in client.history(run.id) if e.kind == "step"]
        assert [e.step for e in rows] == list(range(1500))  # every step once, none lost
        # The loop kept stepping while the server was gone: rows were produced all along.
        during = [e for e in rows if killed_at < e.wall_time < back_at]
        assert len(during) > 50, len(during)
        gaps = [b.wall_time - a.wall_time for a, b in zip(during, during[1:])]
        assert max(gaps) < 1.0, max(gaps)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_replay_reapplies_the_commands_at_the_same_steps_bit_for_bit(cluster, tmp_path):
    log = tmp_path / "a.log"
    proc = _script("noisy_sgd.py", cluster.address, log, "--name", "orig", "--steps", "500", "--step-delay", "0.01")
    try:
        client = cluster.client()
        run = wait_for(_running_run(client, "orig", 30), 120, "the run never showed up")
        r = _cli(cluster.address, "set", str(run.id), "lr_scale", "0.3")
        assert r.returncode == 0, r.stdout + r.stderr
        _finish(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
    log2 = tmp_path / "b.log"
    proc = _script("noisy_sgd.py", cluster.address, log2, "--name", "copy", "--steps", "500",
                   "--replay", str(run.id))
    _finish(proc, log2)
    (copy,) = [x for x in client.list() if x.name == "copy"]
    assert copy.state == "COMPLETED" and copy.replay_of == run.id
    orig_cmd, = client.controls(run.id)
    copy_cmd, = client.controls(copy.id)
    assert copy_cmd.status == "APPLIED" and copy_cmd.applied_step == orig_cmd.applied_step
    a, b = client.metrics(run.id), client.metrics(copy.id)
    assert b["STEP/loss"]["step"] == list(range(500))
    assert b["STEP/loss"]["value"] == a["STEP/loss"]["value"]  # bit-for-bit
    assert b["STEP/lr_scale"]["value"] == a["STEP/lr_scale"]["value"]


_FAILING = """
import time, trainctl
with trainctl.init(name="boom") as run:
    for i in range(30):
        run.step(); run.log(x=float(i)); time.sleep(0.01)
    raise ValueError("bad batch at step 29\\nsecond line")
"""
_CANCELLABLE = """
import time, trainctl
with trainctl.init(name="stop-me") as run:
    while not run.cancelled:
        run.step(); run.log(x=1.0); time.sleep(0.01)
print("saw the cancel at step", run.step_count)
"""


def _inline(code: str, address: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TRAINCTL_SERVER": address, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def test_exception_fails_the_run_with_its_one_line_reason_and_cancel_reaches_the_loop(cluster, tmp_path):
    client = cluster.client()
    p = _inline(_FAILING, cluster.address, tmp_path / "f.log")
    assert p.wait(120) == 1  # the user's exception propagates as usual
    (x,) = [e for e in client.list() if e.name == "boom"]
    assert x.state == "FAILED" and x.message == "ValueError: bad batch at step 29", x
    assert client.metrics(x.id)["STEP/x"]["step"] == list(range(30))

    log = tmp_path / "c.log"
    p = _inline(_CANCELLABLE, cluster.address, log)
    try:
        run = wait_for(_running_run(client, "stop-me", 5), 120, "the run never showed up")
        r = _cli(cluster.address, "cancel", str(run.id))
        assert r.returncode == 0, r.stdout + r.stderr
        assert p.wait(60) == 0, log.read_text()
    finally:
        if p.poll() is None:
            p.kill()
    assert "saw the cancel" in log.read_text()
    assert client.get(run.id).state == "CANCELLED"


_TOKENED = """
import trainctl
with trainctl.init(name="{name}") as run:
    for i in range(20):
        run.step(); run.log(x=float(i))
print("undelivered:", run.undelivered)
"""


def test_with_auth_on_the_client_token_attaches_and_a_wrong_one_never_hurts_the_loop(tmp_path):
    from tests.conftest import Cluster
    c = Cluster(tmp_path, ["--client-token", "c-secret-1", "--worker-token", "w-secret-2"])
    try:
        tok = tmp_path / "token"
        tok.write_text("c-secret-1\n")
        env = {**os.environ, "TRAINCTL_SERVER": c.address, "TRAINCTL_TOKEN_FILE": str(tok)}
        env.pop("TRAINCTL_TOKEN", None)
        ok = subprocess.run([sys.executable, "-c", _TOKENED.format(name="authed")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and "undelivered: []" in ok.stdout, ok.stdout + ok.stderr
        env["TRAINCTL_TOKEN"] = "wrong"
        bad = subprocess.run([sys.executable, "-c", _TOKENED.format(name="refused")], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        # The loop ran to its end; the refusal is a warning, and finish() says what was lost.
        assert bad.returncode == 0, bad.stdout + bad.stderr
        assert "UNAUTHENTICATED" in bad.stderr and "20 metric rows" in bad.stdout + bad.stderr
        client = Client(c.address, token="c-secret-1")
        names = {x.name: x for x in client.list()}
        assert names["authed"].state == "COMPLETED" and "refused" not in names
        assert client.metrics(names["authed"].id)["STEP/x"]["step"] == list(range(20))
    finally:
        c.stop()
