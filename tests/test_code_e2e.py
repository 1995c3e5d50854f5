"""Submitted code end to end (issue 13, "Done means"), with real processes only: a real
server (SQLite file, artifact store in a directory or in a real S3-compatible server on
loopback), real workers, the examples/attach scripts submitted as code with the real CLI.

- steered mid-run: `trainctl set-lr` / `trainctl set` acknowledged at a step boundary,
  the stored LR curve bent from that step on; `trainctl logs -f` shows the script's
  prints and ends by itself when the run does;
- cancelled: every process of the command's group (a background `sleep` included) gone;
- a worker killed (SIGKILL; its command dies with it, through the lifeline) and the run
  resumed on another worker with another working directory from the artifact store in S3
  (moto's server, tests/s3.py), every step stored once and the steps before the checkpoint
  still the first attempt's. The store is one interface (server/artifacts): the directory
  store on this path (another box fetching a checkpoint from it) is proven with real
  processes by test_faults.py::test_worker_killed_mid_run_resumes_from_checkpoint, and
  both stores blob for blob by test_artifact_store.py.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import NO_SPEC_RUNS, Cluster, experiment_events, wait_for

pytest_plugins = ["tests.s3"]  # s3_server: moto's S3 server on loopback, one per session

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CODE = ROOT / "examples" / "attach"
FAST_LEASE = ["--heartbeat", "0.5", "--lease-timeout", "3"]
STEPS_PER_EPOCH = 24      # 1500 digits / batch 64, in every examples/attach script


# ---------------------------------------------------------------------- helpers


def _cli(address: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAINCTL_SERVER": address}
    return subprocess.run([sys.executable, "-m", "trainctl.client.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _job(tmp: Path, name: str, command: str, example: str | None = None, **fields) -> Path:
    """A job spec file: helper B's examples/code/<example>.yaml when it is there (so the
    shipped file is what runs), with the command sized for a test; else a minimal one."""
    job: dict = {}
    shipped = ROOT / "examples" / "code" / f"{example}.yaml" if example else None
    if shipped is not None and shipped.exists():
        job = yaml.safe_load(shipped.read_text())
    job.update(name=name, command=command, **fields)
    job.setdefault("env", {})["OMP_NUM_THREADS"] = "1"
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _submit(address: str, job: Path, code: Path = CODE) -> int:
    r = _cli(address, "submit", str(job), "--code", str(code), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return int(json.loads(r.stdout)["id"])


def _step_rows(db_path: Path, exp_id: int) -> dict[int, tuple[int, int]]:
    """step -> (how many rows, the attempt that wrote it), for the 'loss' series."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT step, COUNT(*), MAX(attempt) FROM metrics WHERE experiment_id=? AND scope='STEP' "
                          "AND name='loss' GROUP BY step ORDER BY step", (exp_id,)).fetchall()
    return {s: (n, a) for s, n, a in rows}


def _assert_every_step_once(db_path: Path, exp_id: int, steps: int) -> dict[int, int]:
    rows = _step_rows(db_path, exp_id)
    assert sorted(rows) == list(range(steps)), f"steps missing: {sorted(set(range(steps)) - set(rows))[:20]}"
    assert all(n == 1 for n, _ in rows.values()), "a step is stored twice"
    return {s: a for s, (_, a) in rows.items()}


def _procs_in(root: Path) -> dict[int, int]:
    """pid -> process group of every process whose working directory is under `root`
    (a submitted command runs in its unpacked folder there, with all it started)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "cwd").startswith(str(root)):
                out[int(entry.name)] = os.getpgid(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _kill_worker(worker) -> None:
    """kill -9 of the worker (the agent and its run processes). The command runs in its
    own process group: its lifeline (workers/proc_group.py) must take it down too."""
    os.killpg(worker.popen.pid, signal.SIGKILL)
    worker.popen.wait()


# ---------------------------------------------------------------------- one worker: steer, logs, cancel


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("code")
    c = Cluster(tmp, FAST_LEASE)
    c.workdir = tmp / "box"
    c.add_worker("w0", "--workdir", str(c.workdir), env=NO_SPEC_RUNS)
    yield c
    c.stop()


def test_plain_loop_as_code_is_steered_and_its_logs_followed(box, tmp_path):
    epochs = 8
    job = _job(tmp_path, "steer-code", f"python plain_loop.py --epochs {epochs} --step-delay 0.03", "plain_loop")
    exp_id = _submit(box.address, job)
    follow = subprocess.Popen([sys.executable, "-m", "trainctl.client.cli", "logs", str(exp_id), "-f"],
                              env={**os.environ, "TRAINCTL_SERVER": box.address}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        client = box.client()
        run = wait_for(lambda: (x := client.get(exp_id)).state == "RUNNING" and x.last_step >= 10 and x, 180,
                        f"experiment {exp_id} never ran:\n{box.logs()}")
        assert run.kind == "CODE", run
        r = _cli(box.address, "set-lr", str(exp_id), "0.02")
        assert r.returncode == 0 and "applied at step" in r.stdout, r.stdout + r.stderr
        r = _cli(box.address, "set", str(exp_id), "dropout", "0.3")
        assert r.returncode == 0 and "applied at step" in r.stdout, r.stdout + r.stderr
        final = experiment_events(client, exp_id)[-1]
        assert final.state == "COMPLETED", (final, box.logs())
        out, _ = follow.communicate(timeout=60)       # -f ends by itself at the final state
    finally:
        if follow.poll() is None:
            follow.kill()
    assert f"done: experiment {exp_id}, {epochs * STEPS_PER_EPOCH} steps" in out, out
    steps = epochs * STEPS_PER_EPOCH
    _assert_every_step_once(box.db_path, exp_id, steps)
    lr_cmd = {c.kind: c for c in client.controls(exp_id)}["SET_LR"]
    assert lr_cmd.status == "APPLIED" and lr_cmd.new_value == pytest.approx(0.02)
    # MultiStepLR's own curve (0.1, x0.5 from half the epochs), x one constant from the applied step
    s, half = lr_cmd.applied_step, epochs // 2 * STEPS_PER_EPOCH
    sched = [0.1 * (0.5 if k >= half else 1.0) for k in range(steps)]
    want = [sched[k] if k < s else sched[k] * 0.02 / sched[s] for k in range(steps)]
    m = client.metrics(exp_id)
    assert m["STEP/lr"]["step"] == list(range(steps))
    assert m["STEP/lr"]["value"] == pytest.approx(want, rel=1e-9)


def test_cancel_ends_the_whole_process_group(box, tmp_path):
    # A background `sleep` the script never waits for: only a group-wide signal ends it.
    job = _job(tmp_path, "cancel-code", "sleep 1000 & exec python noisy_sgd.py --steps 100000 --step-delay 0.01",
               "noisy_sgd", cancel_grace_s=5)
    exp_id = _submit(box.address, job)
    client = box.client()
    wait_for(lambda: client.get(exp_id).last_step >= 5, 180, f"experiment {exp_id} never ran:\n{box.logs()}")
    procs = wait_for(lambda: (p := _procs_in(box.workdir)) and len(p) >= 2 and p, 30, "no command processes")
    groups = set(procs.values())
    assert len(groups) == 1 and os.getpgid(box.workers[0].popen.pid) not in groups, procs  # its own group
    r = _cli(box.address, "cancel", str(exp_id))
    assert r.returncode == 0, r.stdout + r.stderr
    final = experiment_events(client, exp_id)[-1]
    assert final.state == "CANCELLED", (final, box.logs())
    wait_for(lambda: not any(_group_alive(g) for g in groups), 15, f"the command's group outlived its run: {procs}")
    wait_for(lambda: not _procs_in(box.workdir), 15, f"processes left: {_procs_in(box.workdir)}")
    assert box.workers[0].popen.poll() is None, "the worker itself must keep serving"


# ---------------------------------------------------------------------- two boxes: kill, resume elsewhere


def test_killed_worker_the_run_resumes_on_another_box_from_the_artifact_store(tmp_path, monkeypatch, s3_server):
    # The server process's store in moto's S3 server, through s3fs.
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    c = Cluster(tmp_path, [*FAST_LEASE, "--artifacts", s3_server.url()])
    try:
        epochs = 10
        job = _job(tmp_path, "roam-s3", f"python resumable.py --epochs {epochs} --step-delay 0.03",
                   "resumable", max_restarts=2)
        box_a, box_b = tmp_path / "box-a", tmp_path / "box-b"
        w0 = c.add_worker("w0", "--workdir", str(box_a), env=NO_SPEC_RUNS)
        exp_id = _submit(c.address, job)
        client = c.client()
        wait_for(lambda: (x := client.get(exp_id)).state == "RUNNING" and x.worker_id == "w0", 180,
                  f"experiment {exp_id} never ran on w0:\n{c.logs()}")
        # Box B starts now (its torch import overlaps the run; it has nothing to take until
        # box A is gone): nothing of box A's on its disk.
        c.add_worker("w1", "--workdir", str(box_b), env=NO_SPEC_RUNS)

        def stored_checkpoint():
            return [a for a in client.artifacts(exp_id, "checkpoint") if a.step >= 2 * STEPS_PER_EPOCH]
        wait_for(stored_checkpoint, 240, f"no checkpoint reached the store:\n{c.logs()}", every=0.05)
        assert client.get(exp_id).state == "RUNNING"
        assert _procs_in(box_a), "the command runs in box A"
        _kill_worker(w0)
        wait_for(lambda: not _procs_in(box_a), 15, f"the command outlived its worker: {_procs_in(box_a)}")
        events = experiment_events(client, exp_id)
        final = events[-1]
        assert final.state == "COMPLETED", (final, c.logs())
        assert (final.attempt, final.worker_id) == (2, "w1")
        assert any(e.state == "QUEUED" and "w0 lost" in e.message for e in events), events
        lines = [ln for ln in _cli(c.address, "logs", str(exp_id), "--attempt", "2").stdout.splitlines()
                 if "resumed at epoch" in ln]
        assert lines and "resumed=True" in lines[0], _cli(c.address, "logs", str(exp_id)).stdout
        resumed_epoch = int(lines[0].split("resumed at epoch ")[1].split()[0])
        assert 2 <= resumed_epoch < epochs
        by = _assert_every_step_once(c.db_path, exp_id, epochs * STEPS_PER_EPOCH)
        cut = resumed_epoch * STEPS_PER_EPOCH
        # Before the checkpoint: attempt 1's rows, untouched (attempt 2 did not start over);
        # from it on: attempt 2's (it redid what attempt 1 had done past the checkpoint).
        assert {by[s] for s in range(cut)} == {1}, by
        assert {by[s] for s in range(cut, len(by))} == {2}, by
        with sqlite3.connect(c.db_path) as db:
            n_epochs = db.execute("SELECT COUNT(DISTINCT epoch) FROM metrics WHERE experiment_id=? AND "
                                  "scope='EPOCH' AND name='val_acc'", (exp_id,)).fetchone()[0]
        assert n_epochs == epochs
    finally:
        c.stop()
