"""Faults with real processes killed for real: workers and the server die mid-run,
a stale worker comes back, workers stop gracefully. Nothing lost, nothing doubled."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time

import pytest

from tests.conftest import RESNET10T, Cluster, digits_spec, experiment_events

pytestmark = pytest.mark.slow

FAST_LEASE = ["--heartbeat", "0.5", "--lease-timeout", "3"]
# The runs below keep resnet10t: their step counts were set on its step time, so the
# faults land where they were written to (conftest.RESNET10T).


@pytest.fixture
def fast_cluster(tmp_path):
    c = Cluster(tmp_path, FAST_LEASE)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def survivor(tmp_path_factory):
    """One server and one worker w0 for the faults the worker lives through (the server
    killed and restarted on its database, stopped, its database locked): each test waits
    for its run to end, and leaves the cluster whole. Saves a server start and a worker's
    torch import per test. Logs at INFO (lifecycle lines)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAINCTL_LOG", "INFO")
        c = Cluster(tmp_path_factory.mktemp("survivor"), FAST_LEASE)
        c.add_worker("w0")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tests in a row (file order) on one server, the second killing the worker the
    first leaves alive (_alive_or_new): a server start and a torch import saved."""
    c = Cluster(tmp_path_factory.mktemp("pair"), FAST_LEASE)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """Like `pair`, for three tests: each stops or kills one worker, finishes on a new one."""
    c = Cluster(tmp_path_factory.mktemp("relay"), FAST_LEASE)
    yield c
    c.stop()


def _alive_or_new(cluster, worker_id: str):
    """The one live worker the previous test left, or a new one (the test run alone)."""
    live = [w for w in cluster.workers if w.popen.poll() is None]
    assert len(live) <= 1, [w.args for w in live]
    return live[0] if live else cluster.add_worker(worker_id)


def _wid(worker) -> str:
    return worker.args[worker.args.index("--worker-id") + 1]


def _spec(name: str, **kw) -> dict:
    # 4 epochs x 8 steps, checkpoint every epoch: small, yet long enough to kill mid-run.
    return digits_spec(name, epochs=4, max_steps=8, model=RESNET10T, **kw)


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


def _on(c, exp_id: int, worker_id: str, timeout: float = 180) -> None:
    """Wait until `worker_id` holds the run, so that a worker started next has nothing to
    take until the fault hands the run back (its torch import then overlaps the lease
    wait instead of following it)."""
    deadline = time.monotonic() + timeout
    while c.get(exp_id).worker_id != worker_id:
        assert time.monotonic() < deadline, f"experiment {exp_id} never reached {worker_id}"
        time.sleep(0.05)


def test_worker_killed_mid_run_resumes_from_checkpoint(pair, tmp_path):
    """...on another box: the second worker has its own empty workdir, so the checkpoint
    comes from the artifact store (workers/checkpoint_sync.py)."""
    w0 = pair.add_worker("w0")    # first: its torch import overlaps the server start
    c = pair.client()
    ref = c.submit(_spec("reference"))
    assert c.wait(ref.id, timeout=180).state == "COMPLETED", pair.logs()

    x = c.submit(_spec("killed"))
    _on(c, x.id, "w0")
    pair.add_worker("w1", "--workdir", str(tmp_path / "box-b"))   # nothing of w0's on its disk
    _wait_epoch(c, x.id, 1)               # epochs 0 and 1 done, checkpoints written...
    deadline = time.monotonic() + 60      # ...and the one after epoch 1 stored (uploads run behind training)
    while not any(a.kind == "checkpoint" and a.step >= 16 for a in c.artifacts(x.id)):
        assert time.monotonic() < deadline, pair.logs()
        time.sleep(0.05)
    w0.stop(signal.SIGKILL)
    t_kill = time.monotonic()
    for ev in c.watch(x.id, live_only=True):  # the server notices within the lease timeout
        if ev.kind == "experiment" and ev.experiment.state == "QUEUED":
            break
    noticed = time.monotonic() - t_kill
    assert noticed < 3 + 2.5, f"requeue took {noticed:.1f} s"
    assert "w0 lost" in ev.experiment.message, ev.experiment

    events = experiment_events(c, x.id)
    final = events[-1]
    assert final.state == "COMPLETED", pair.logs()
    assert final.attempt == 2 and final.worker_id == "w1"
    why = " ".join(e.message for e in events if e.state == "RUNNING" and e.attempt == 2)
    assert "fetched from the artifact store" in why and "resumed from ckpt-" in why, why
    _assert_complete_history(pair.db_path, x.id, steps=32, epochs=4)
    # deterministic CPU training: the resumed run equals the uninterrupted one exactly
    assert _losses(c, x.id) == _losses(c, ref.id)
    assert final.summary["val_top1"] == c.get(ref.id).summary["val_top1"]


def test_gives_up_after_max_restarts(pair):
    w = _alive_or_new(pair, "w1")          # the test above leaves w1 alive and idle
    c = pair.client()
    x = c.submit({**_spec("fragile"), "max_restarts": 0})
    _wait_epoch(c, x.id, 0)
    w.stop(signal.SIGKILL)
    final = c.wait(x.id, timeout=60)
    assert final.state == "FAILED"
    assert f"{_wid(w)} lost" in final.message and "gave up after 0 restarts" in final.message


def test_server_killed_mid_run_loses_nothing(survivor):
    c = survivor.client()
    x = c.submit(digits_spec("server-dies", epochs=6, max_steps=8, model=RESNET10T))
    _wait_epoch(c, x.id, 0)
    survivor.server.stop(signal.SIGKILL)
    time.sleep(2.0)                        # the worker keeps training, buffering metrics
    survivor.start_server()
    c = survivor.client()
    final = c.wait(x.id, timeout=180)
    assert final.state == "COMPLETED", survivor.logs()
    assert final.attempt == 1               # the worker re-adopted its run: no restart
    _assert_complete_history(survivor.db_path, x.id, steps=48, epochs=6)
    # a watcher resuming from a step sees the rest exactly once
    steps = [ev.step for ev in c.watch(x.id, from_step=20) if ev.kind == "step"]
    assert steps == list(range(20, 48))


def test_server_sigterm_exits_cleanly(fast_cluster):
    fast_cluster.wait_serving()
    assert fast_cluster.server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in fast_cluster.server.output()



# ---------------------------------------------------------------------- issue 10, items 1-5
# Each asserts the invariants (every step 0..N-1 exactly once in a COMPLETED run, every
# epoch row, restarts not spent on server faults, no checkpoint of another lineage or of
# a fenced attempt resumed), not only the final state. Workers log at INFO so the tests
# can read their lifecycle lines ("resumed from ...", "fenced ...").


@pytest.fixture
def info_logs(monkeypatch):
    monkeypatch.setenv("TRAINCTL_LOG", "INFO")


def _small_spec(name: str, epochs: int = 6, steps: int = 6, **train) -> dict:
    # Tiny: the box that runs these is often shared and slow. A run that ends during a
    # fault is still a fair test: its results must get through once the fault is over.
    return digits_spec(name, train={"epochs": epochs, "seed": 0, "max_steps_per_epoch": steps, **train},
                       model=RESNET10T)


def _kill_group(proc) -> None:
    """SIGKILL a worker with its run process (a box that died), and wait for it."""
    os.killpg(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait()


def _row(db_path, exp_id: int) -> tuple:
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT state, attempt, restarts FROM experiments WHERE id=?", (exp_id,)).fetchone()


def _ckpt_dir(cluster, exp_id: int, workdir=None):
    with sqlite3.connect(cluster.db_path) as db:
        store_id = db.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()[0]
    return (workdir or cluster.tmp / "runs") / store_id / f"exp-{exp_id}"


def _ckpts(d) -> list[str]:
    return sorted((p.name for p in d.glob("ckpt-*.pt")), key=lambda n: int(n.split("-")[1]))


def test_server_stopped_past_the_lease_loses_nothing_and_spends_no_restart(survivor):
    c = survivor.client()
    x = c.submit(_small_spec("server-frozen"))
    _wait_epoch(c, x.id, 0, timeout=300)
    os.kill(survivor.server.popen.pid, signal.SIGSTOP)       # 2x the lease: no news from anyone
    time.sleep(6.0)
    os.kill(survivor.server.popen.pid, signal.SIGCONT)
    final = c.wait(x.id, timeout=300)
    assert final.state == "COMPLETED", survivor.logs()
    _assert_complete_history(survivor.db_path, x.id, steps=36, epochs=6)
    assert _row(survivor.db_path, x.id) == ("COMPLETED", 1, 0), "the server's own stall cost a restart"


def _hold_write_lock(db_path, seconds: float):
    """Another process holds SQLite's write lock (BEGIN EXCLUSIVE) for `seconds`."""
    import subprocess
    import sys

    code = ("import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
            "db.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(float(sys.argv[2]))\n"
            "db.execute('COMMIT')\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(db_path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_held_database_write_lock_loses_nothing_and_spends_no_restart(survivor):
    c = survivor.client()
    x = c.submit(_small_spec("db-locked"))
    _wait_epoch(c, x.id, 0, timeout=300)
    locker = _hold_write_lock(survivor.db_path, 8.0)         # > 2x the lease
    assert locker.wait(60) == 0
    final = c.wait(x.id, timeout=300)
    assert final.state == "COMPLETED", survivor.logs()
    _assert_complete_history(survivor.db_path, x.id, steps=36, epochs=6)
    assert _row(survivor.db_path, x.id) == ("COMPLETED", 1, 0), "a held DB lock cost a restart"


class _TmpfsCluster(Cluster):
    """A Cluster whose SQLite file lives on a small tmpfs the test can fill."""

    def __init__(self, tmp, mount, server_args):
        self.mount = mount
        # Only the database is on the small disk (the artifact store would default to its
        # folder, and its checkpoints would fill it before the test does).
        super().__init__(tmp, [*server_args, "--artifacts", str(tmp / "artifacts")])

    def start_server(self, wait: bool = True):
        self.db_path = self.mount / "trainctl.db"
        return super().start_server(wait)


def test_database_on_a_full_filesystem_orphans_nothing(tmp_path, info_logs):
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs for the database")
    mount = tmp_path / "dbfs"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    c = None
    try:
        c = _TmpfsCluster(tmp_path, mount, FAST_LEASE)
        w0 = c.add_worker("w0")
        cl = c.client()
        x = cl.submit(_small_spec("disk-full"))
        _wait_epoch(cl, x.id, 1, timeout=300)
        filler = mount / "filler"
        with open(filler, "wb") as f:                       # fill it: every DB write fails now
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        _kill_group(w0)                                     # its lease expires while nothing can be stored
        time.sleep(3 + 4)
        filler.unlink()                                     # space again
        c.add_worker("w1")
        final = cl.wait(x.id, timeout=300)
        assert final.state == "COMPLETED", c.logs()
        _assert_complete_history(c.db_path, x.id, steps=36, epochs=6)
        assert "Traceback" not in c.server.output()
    finally:
        if c is not None:
            c.stop()
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_fresh_database_over_an_old_workdir_never_resumes_the_old_run(tmp_path, info_logs):
    workdir = tmp_path / "runs"
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    # Both servers and all three workers start at once (their torch imports overlap); the
    # new cluster's workers have nothing to run until the old run is over.
    old = new = None
    try:
        old = Cluster(tmp_path / "old", FAST_LEASE)
        new = Cluster(tmp_path / "new", FAST_LEASE)         # a fresh database: experiment ids start at 1 again
        old.add_worker("w0", "--workdir", str(workdir))
        new_workers = {w: new.add_worker(w, "--workdir", str(workdir)) for w in ("w0", "w1")}
        c = old.client()
        x = c.submit(_small_spec("old-run", epochs=3, steps=4, keep_checkpoints=2))
        assert x.id == 1 and c.wait(x.id, timeout=300).state == "COMPLETED", old.logs()
        old_dir = _ckpt_dir(old, 1, workdir)
        deadline = time.monotonic() + 30     # pruned to what the spec keeps just after COMPLETED is sent
        while _ckpts(old_dir) != ["ckpt-8-a1.pt", "ckpt-12-a1.pt"]:
            assert time.monotonic() < deadline, _ckpts(old_dir)
            time.sleep(0.2)
        old.stop()

        c = new.client()
        y = c.submit(_small_spec("new-run", epochs=4, steps=4, seed=5))
        assert y.id == 1
        _wait_epoch(c, y.id, 1, timeout=300)
        holder = c.get(y.id).worker_id                      # either new worker: same workdir
        (other,) = [p for w, p in new_workers.items() if w != holder]
        new_dir = _ckpt_dir(new, 1, workdir)
        assert new_dir != old_dir
        # The other worker frozen for the few ms the forged file takes (far inside the lease;
        # the requeue comes >= 2.5 s after the kill): it can only ever see the forged file.
        os.killpg(other.popen.pid, signal.SIGSTOP)
        try:
            _kill_group(new_workers[holder])
            # Someone copies the old run's newest checkpoint in, named like this run's newest.
            step = int(_ckpts(new_dir)[-1].split("-")[1])
            shutil.copyfile(old_dir / "ckpt-12-a1.pt", new_dir / f"ckpt-{step}-a9.pt")
        finally:
            os.killpg(other.popen.pid, signal.SIGCONT)
        final = c.wait(y.id, timeout=300)
        assert final.state == "COMPLETED" and final.attempt == 2, new.logs()
        _assert_complete_history(new.db_path, y.id, steps=16, epochs=4)
        out = other.output()
        assert f"ckpt-{step}-a9.pt not resumed: it belongs to store" in out, out
        resumed = [line for line in out.splitlines() if "attempt 2: resumed from" in line]
        assert resumed and "-a1.pt (attempt 1)" in resumed[0], out
    finally:
        for cluster in (old, new):
            if cluster is not None:
                cluster.stop()


def test_worker_sigterm_hands_the_run_back(relay):
    w0 = relay.add_worker("w0")            # the first of the relay
    c = relay.client()
    x = c.submit(digits_spec("handoff", epochs=4, max_steps=8, model=RESNET10T))
    _on(c, x.id, "w0")
    relay.add_worker("w1")          # its torch import overlaps epoch 0; nothing to take until the hand-back
    stream = c.watch(x.id, live_only=True)  # one stream: it sees the hand-back before w1 takes the run
    next(ev for ev in stream if ev.kind == "epoch")
    assert w0.stop(signal.SIGTERM) == 0
    seen = []
    for ev in stream:
        if ev.kind == "experiment":
            seen.append(ev.experiment)
            if ev.experiment.is_final:
                break
    handed = [e for e in seen if e.state == "QUEUED"]
    assert handed and handed[0].attempt == 1 and "handed back" in handed[0].message, seen
    assert not any("lost" in e.message for e in seen), seen   # handed back, not found dead at lease expiry
    final = seen[-1]
    assert (final.state, final.attempt, final.worker_id) == ("COMPLETED", 2, "w1"), relay.logs()
    _assert_complete_history(relay.db_path, x.id, steps=32, epochs=4)


def test_truncated_checkpoint_is_set_aside_and_the_run_completes(relay, info_logs):
    victim = _alive_or_new(relay, "w1")     # the test above leaves w1 alive and idle
    c = relay.client()
    x = c.submit(_small_spec("torn", epochs=6, steps=4))
    _wait_epoch(c, x.id, 0, timeout=300)
    d = _ckpt_dir(relay, x.id)
    deadline = time.monotonic() + 300
    while len(_ckpts(d)) < 3:                               # epochs 0-2 checkpointed
        assert time.monotonic() < deadline, relay.logs()
        time.sleep(0.05)
    _kill_group(victim)
    names = _ckpts(d)
    for name in names[1:]:                                  # torn: a disk that lied, a bad copy
        (d / name).write_bytes((d / name).read_bytes()[:1000])
    # The artifact store's copies are torn too (else the worker would fetch a good one,
    # test_checkpoint_sync.py): it must refuse to serve them, and the run fall back.
    for blob in (relay.db_path.parent / "artifacts" / "blobs").rglob("*"):
        if blob.is_file() and blob.stat().st_size > 1000:
            blob.write_bytes(blob.read_bytes()[:1000])
    resumer = relay.add_worker("w2")
    events = experiment_events(c, x.id)
    assert events[-1].state == "COMPLETED", relay.logs()
    _assert_complete_history(relay.db_path, x.id, steps=24, epochs=6)
    assert _row(relay.db_path, x.id) == ("COMPLETED", 2, 1)
    why = [e.message for e in events if e.state == "RUNNING" and e.attempt == 2]
    assert why and f"{names[1]} is unreadable" in why[-1] and f"resumed from {names[0]}" in why[-1], events
    assert f"{names[1]} is unreadable" in resumer.output()
    deadline = time.monotonic() + 30                        # removed just after COMPLETED is sent
    while list(d.glob("ckpt-*.pt")):
        assert time.monotonic() < deadline, _ckpts(d)
        time.sleep(0.2)
    assert (d / (names[1] + ".corrupt")).exists()           # kept for a look; the good ones are gone


def test_fenced_attempt_stops_and_nothing_it_wrote_is_delivered_or_resumed(relay, info_logs):
    """A stale worker (frozen past its lease, then back, believing it still owns attempt 1)
    is fenced: it stops, its checkpoints go, none of its metrics land after attempt 2 took
    over, and a later attempt resumes from attempt 2's work only."""
    stale = _alive_or_new(relay, "w2")      # the test above leaves w2 alive and idle
    c = relay.client()
    x = c.submit(_small_spec("fenced", epochs=6, steps=4))
    _wait_epoch(c, x.id, 0, timeout=300)
    os.killpg(stale.popen.pid, signal.SIGSTOP)              # agent and run process frozen past the lease
    for ev in c.watch(x.id, live_only=True):
        if ev.kind == "experiment" and ev.experiment.state == "QUEUED":
            break
    w3 = relay.add_worker("w3")
    for ev in c.watch(x.id, live_only=True):
        if ev.kind == "experiment" and ev.experiment.attempt == 2 and ev.experiment.state == "RUNNING":
            break
    assert ev.experiment.worker_id == "w3", ev.experiment
    os.killpg(stale.popen.pid, signal.SIGCONT)              # it wakes up believing it owns attempt 1
    d = _ckpt_dir(relay, x.id)
    deadline = time.monotonic() + 60
    while "fenced: stopped" not in stale.output():
        assert time.monotonic() < deadline, relay.logs()
        time.sleep(0.2)
    assert not [n for n in _ckpts(d) if n.endswith("-a1.pt")], "a fenced attempt's checkpoints stayed"
    _wait_epoch(c, x.id, 3, timeout=300)
    _kill_group(w3)                                         # the next attempt resumes: from attempt 2's work
    final = c.wait(x.id, timeout=300)
    assert final.state == "COMPLETED" and final.attempt == 3 and final.worker_id == _wid(stale), relay.logs()
    _assert_complete_history(relay.db_path, x.id, steps=24, epochs=6)
    resumed = [line for line in stale.output().splitlines() if "attempt 3: resumed from" in line]
    assert resumed and "-a2.pt (attempt 2)" in resumed[0], stale.output()
    with sqlite3.connect(relay.db_path) as db:
        first2 = db.execute("SELECT MIN(step) FROM metrics WHERE experiment_id=? AND attempt=2 AND scope='STEP'",
                            (x.id,)).fetchone()[0]
        late1 = db.execute("SELECT COUNT(*) FROM metrics WHERE experiment_id=? AND attempt=1 AND step>?",
                           (x.id, first2)).fetchone()[0]
    assert late1 == 0, "the fenced attempt delivered steps after its successor started"
