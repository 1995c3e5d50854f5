"""Faults with real processes killed for real: workers and the server die mid-run,
a stale worker comes back, workers stop gracefully. Nothing lost, nothing doubled."""
from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest

from tests.conftest import Cluster, digits_spec

pytestmark = pytest.mark.slow

FAST_LEASE = ["--heartbeat", "0.5", "--lease-timeout", "3"]


@pytest.fixture
def fast_cluster(tmp_path):
    c = Cluster(tmp_path, FAST_LEASE)
    yield c
    c.stop()


def _spec(name: str, **kw) -> dict:
    # 4 epochs x 8 steps, checkpoint every epoch: small, yet long enough to kill mid-run.
    return digits_spec(name, epochs=4, max_steps=8, **kw)


def _wait_epoch(c, exp_id: int, epoch: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for ev in c.watch(exp_id, live_only=True):
        if ev.kind == "epoch" and ev.epoch >= epoch:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"experiment {exp_id} did not reach epoch {epoch}")
    raise AssertionError(f"experiment {exp_id} ended before epoch {epoch}")


def _assert_complete_history(db_path, exp_id: int, steps: int, epochs: int) -> None:
    with sqlite3.connect(db_path) as db:
        per_step = db.execute("SELECT step, COUNT(*) FROM metrics WHERE experiment_id=? AND scope='STEP' "
                              "AND name='loss' GROUP BY step ORDER BY step", (exp_id,)).fetchall()
        n_epochs = db.execute("SELECT COUNT(*) FROM metrics WHERE experiment_id=? AND scope='EPOCH' "
                              "AND name='val_top1'", (exp_id,)).fetchone()[0]
    assert [s for s, _ in per_step] == list(range(steps)), "a step is missing"
    assert all(n == 1 for _, n in per_step), "a step is stored twice"
    assert n_epochs == epochs


def _losses(c, exp_id: int) -> list[float]:
    return c.metrics(exp_id, scope="step", names=["loss"])["STEP/loss"]["value"]


def test_worker_killed_mid_run_resumes_from_checkpoint(fast_cluster):
    c = fast_cluster.client()
    w0 = fast_cluster.add_worker("w0")
    ref = c.submit(_spec("reference"))
    assert c.wait(ref.id, timeout=180).state == "COMPLETED", fast_cluster.logs()

    x = c.submit(_spec("killed"))
    _wait_epoch(c, x.id, 1)               # epochs 0 and 1 done, checkpoint written
    w0.stop(signal.SIGKILL)
    t_kill = time.monotonic()
    for ev in c.watch(x.id, live_only=True):  # the server notices within the lease timeout
        if ev.kind == "experiment" and ev.experiment.state == "QUEUED":
            break
    noticed = time.monotonic() - t_kill
    assert noticed < 3 + 2.5, f"requeue took {noticed:.1f} s"
    q = c.get(x.id)
    assert "w0 lost" in q.message

    fast_cluster.add_worker("w1")
    final = c.wait(x.id, timeout=180)
    assert final.state == "COMPLETED", fast_cluster.logs()
    assert final.attempt == 2 and final.worker_id == "w1"
    _assert_complete_history(fast_cluster.db_path, x.id, steps=32, epochs=4)
    # deterministic CPU training: the resumed run equals the uninterrupted one exactly
    assert _losses(c, x.id) == _losses(c, ref.id)
    assert final.summary["val_top1"] == c.get(ref.id).summary["val_top1"]


def test_gives_up_after_max_restarts(fast_cluster):
    c = fast_cluster.client()
    w0 = fast_cluster.add_worker("w0")
    x = c.submit({**_spec("fragile"), "max_restarts": 0})
    _wait_epoch(c, x.id, 0)
    w0.stop(signal.SIGKILL)
    final = c.wait(x.id, timeout=60)
    assert final.state == "FAILED"
    assert "w0 lost" in final.message and "gave up after 0 restarts" in final.message


def test_stale_worker_is_fenced_and_drops_the_run(fast_cluster):
    c = fast_cluster.client()
    w0 = fast_cluster.add_worker("w0")
    x = c.submit(digits_spec("stale", epochs=6, max_steps=8))
    _wait_epoch(c, x.id, 0)
    os.killpg(w0.popen.pid, signal.SIGSTOP)  # frozen (agent and run process), not dead: its lease expires
    for ev in c.watch(x.id, live_only=True):
        if ev.kind == "experiment" and ev.experiment.state == "QUEUED":
            break
    fast_cluster.add_worker("w1")
    for ev in c.watch(x.id, live_only=True):
        if ev.kind == "experiment" and ev.experiment.attempt == 2 and ev.experiment.state == "RUNNING":
            break
    os.killpg(w0.popen.pid, signal.SIGCONT)  # comes back believing it still owns attempt 1
    final = c.wait(x.id, timeout=180)
    assert final.state == "COMPLETED" and final.attempt == 2 and final.worker_id == "w1", fast_cluster.logs()
    _assert_complete_history(fast_cluster.db_path, x.id, steps=48, epochs=6)
    with sqlite3.connect(fast_cluster.db_path) as db:
        # epoch 0's rows (steps 0-7, its EPOCH row at step 8) are attempt 1's, legitimately
        attempts = {a for (a,) in db.execute("SELECT DISTINCT attempt FROM metrics WHERE experiment_id=? "
                                             "AND scope='STEP' AND step >= 8", (x.id,))}
    assert attempts == {2}, "a fenced attempt wrote metrics after the new attempt took over"
    time.sleep(1.0)
    assert "fenced" in w0.output() or "fenced" in fast_cluster.server.output()


def test_server_killed_mid_run_loses_nothing(fast_cluster):
    c = fast_cluster.client()
    fast_cluster.add_worker("w0")
    x = c.submit(digits_spec("server-dies", epochs=6, max_steps=8))
    _wait_epoch(c, x.id, 0)
    fast_cluster.server.stop(signal.SIGKILL)
    time.sleep(2.0)                        # the worker keeps training, buffering metrics
    fast_cluster.start_server()
    c = fast_cluster.client()
    final = c.wait(x.id, timeout=180)
    assert final.state == "COMPLETED", fast_cluster.logs()
    assert final.attempt == 1               # the worker re-adopted its run: no restart
    _assert_complete_history(fast_cluster.db_path, x.id, steps=48, epochs=6)
    # a watcher resuming from a step sees the rest exactly once
    steps = [ev.step for ev in c.watch(x.id, from_step=20) if ev.kind == "step"]
    assert steps == list(range(20, 48))


def test_worker_sigterm_hands_the_run_back(fast_cluster):
    c = fast_cluster.client()
    w0 = fast_cluster.add_worker("w0")
    x = c.submit(digits_spec("handoff", epochs=4, max_steps=8))
    _wait_epoch(c, x.id, 0)
    assert w0.stop(signal.SIGTERM) == 0
    q = c.get(x.id)
    assert q.state == "QUEUED" and "handed back" in q.message
    fast_cluster.add_worker("w1")
    final = c.wait(x.id, timeout=180)
    assert final.state == "COMPLETED", fast_cluster.logs()
    _assert_complete_history(fast_cluster.db_path, x.id, steps=32, epochs=4)


def test_server_sigterm_exits_cleanly(fast_cluster):
    assert fast_cluster.server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in fast_cluster.server.output()
