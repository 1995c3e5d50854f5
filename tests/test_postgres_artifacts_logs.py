"""Issue 13's store code on PostgreSQL as on SQLite, and PostgreSQL going away under a
running fleet.

- Artifact records (store/artifacts.py, migration 0006) and log lines (store/logs.py,
  migration 0007) through the store methods on both back ends: add, replace, list,
  delete, retention, gc candidates; log lines stored once however often they are sent,
  the per-experiment bound and its floor, tail and attempt reads; and the races that
  only a shared database has: two store instances (separate engines, as two servers
  on one database) uploading the same name, or inserting the same log lines, at once.
- A server process on PostgreSQL serving the Artifacts service end to end.
- The outage: while a real worker trains, PostgreSQL stopped (pg_ctl stop -m fast:
  connections refused) and then frozen (SIGSTOP of all its processes: calls hang), each
  for longer than the lease timeout. Clients get UNAVAILABLE with a readable message
  while it refuses; the run is neither failed nor requeued (attempt 1, no restart), and
  the COMPLETED run has every step exactly once (tests/test_faults.py has the SQLite
  versions: a held write lock, a stopped server).
"""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Proc, digits_spec, free_port, wait_healthy
from trainctl.server.artifacts.local import LocalBlobStore
from trainctl.server.artifacts.retention import Keeper
from trainctl.server.store import SqlAlchemyStore, open_store
from trainctl.server.store import entities as E
from trainctl.server.store.artifacts import CHECKPOINT, CODE, FILE
from trainctl.server.store.entities import Artifact, LogLine
from trainctl.server.store.errors import NotFound, StaleAttempt

pytest_plugins = ["tests.pg"]  # pg_server / pg_url / db_url


@pytest.fixture
def store(db_url):
    s = open_store(db_url)
    yield s
    s.close()


def digest(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def ckpt(x_id: int, step: int, attempt: int = 1) -> Artifact:
    return Artifact(x_id, f"ckpt-{step}-a{attempt}.pt", CHECKPOINT, digest(f"{x_id}-{step}-{attempt}"), 1000 + step,
                    attempt=attempt, step=step)


def race(fns, rounds: int = 1) -> list:
    """Run each of `fns` in its own thread, released together; their results (or the
    exceptions they raised), in order."""
    out: list = [None] * len(fns)
    gate = threading.Barrier(len(fns))

    def go(i, fn):
        gate.wait()
        try:
            out[i] = fn()
        except BaseException as exc:  # reported, not lost in the thread
            out[i] = exc

    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


# ---------------------------------------------------------------- artifact records


def test_artifact_records_add_replace_list_delete(store):
    x = store.create_experiment("x", {"name": "x"})
    a, replaced = store.put_artifact(Artifact(x.id, "model.pt", FILE, digest("one"), 10, attempt=1))
    assert replaced is None and a.created_at > 0 and store.get_artifact(x.id, "model.pt") == a
    # Every kind's name fits its column (ARTIFACT_CHECKPOINT is 19 characters).
    for step in (30, 10, 20):
        store.put_artifact(ckpt(x.id, step))
    big = Artifact(x.id, "big.bin", FILE, digest("big"), 5 * 2**40, attempt=1, step=2**40)  # BIGINT size, step
    assert store.put_artifact(big)[0].size == 5 * 2**40
    b, replaced = store.put_artifact(Artifact(x.id, "model.pt", FILE, digest("two"), 20, attempt=2))
    assert replaced == digest("one") and (b.sha256, b.size, b.attempt) == (digest("two"), 20, 2)
    assert store.put_artifact(Artifact(x.id, "model.pt", FILE, digest("two"), 20, attempt=2))[1] is None  # same bytes

    listed = store.list_artifacts(x.id)
    assert [(r.kind, r.step, r.name) for r in listed] == [
        (CHECKPOINT, 10, "ckpt-10-a1.pt"), (CHECKPOINT, 20, "ckpt-20-a1.pt"), (CHECKPOINT, 30, "ckpt-30-a1.pt"),
        (FILE, 0, "model.pt"), (FILE, 2**40, "big.bin")]
    assert [r.name for r in store.list_artifacts(x.id, FILE)] == ["model.pt", "big.bin"]
    assert store.latest_checkpoint(x.id).step == 30 and store.latest_checkpoint(x.id, 25).step == 20
    assert store.latest_checkpoint(x.id, 9) is None
    assert store.find_artifact(digest("two")).name == "model.pt" and store.find_artifact(digest("one")) is None
    assert store.referenced(digest("two")) and not store.referenced(digest("one"))

    # Code archives: experiment 0, named by their digest; uploaded twice, one record.
    code = Artifact(0, digest("tree"), CODE, digest("tree"), 99)
    store.put_artifact(code)
    assert store.put_artifact(code)[1] is None and [r.sha256 for r in store.list_artifacts(0)] == [digest("tree")]

    # Delete by (experiment, name, sha256): a key whose record changed meanwhile stays.
    assert store.drop_artifacts([(x.id, "model.pt", digest("one"))]) == 0
    assert store.drop_artifacts([(x.id, "model.pt", digest("two")), (x.id, "ckpt-10-a1.pt", ckpt(x.id, 10).sha256),
                                 (x.id, "nope", digest("two"))]) == 2
    assert [r.name for r in store.list_artifacts(x.id)] == ["ckpt-20-a1.pt", "ckpt-30-a1.pt", "big.bin"]
    with pytest.raises(NotFound):
        store.get_artifact(x.id, "model.pt")
    with pytest.raises(NotFound):
        store.put_artifact(Artifact(999, "f", FILE, digest("f"), 1, attempt=1))
    with pytest.raises(NotFound):
        store.list_artifacts(999)
    with pytest.raises(ValueError, match="artifact.kind"):
        store.put_artifact(Artifact(x.id, "f", "ARTIFACT_NOPE", digest("f"), 1))


def test_retention_and_gc_candidates(store, tmp_path):
    job = store.create_experiment("job", {"name": "job", "command": "c", "keep_checkpoints": 2,
                                          "code_sha256": digest("used")}, kind=E.CODE)
    other = store.create_experiment("other", {"name": "other", "train": {}})
    for step in (40, 10, 30, 20):  # out of order: retention goes by step
        store.put_artifact(ckpt(job.id, step))
    store.put_artifact(ckpt(other.id, 5))
    store.put_artifact(Artifact(job.id, "notes.txt", FILE, digest("notes"), 5, attempt=1))
    assert store.checkpoint_counts() == {job.id: 4, other.id: 1}
    assert [a.step for a in store.surplus_checkpoints(job.id, 2)] == [20, 10]
    assert store.surplus_checkpoints(job.id, 4) == [] and len(store.surplus_checkpoints(job.id, 0)) == 4

    for seed in ("used", "unused"):
        store.put_artifact(Artifact(0, digest(seed), CODE, digest(seed), 9))
    later = time.time() + 1
    assert [a.sha256 for a in store.unreferenced_code(later)] == [digest("unused")]  # the spec names "used"
    assert store.unreferenced_code(time.time() - 3600) == []  # within the grace period
    assert store.referenced(digest("used")) and store.referenced(digest("unused"))

    surplus = [(a.experiment_id, a.name, a.sha256) for a in store.surplus_checkpoints(job.id, 2)]
    wanted = store.referenced_digests(excluding=surplus)
    assert ckpt(job.id, 10).sha256 not in wanted and ckpt(job.id, 40).sha256 in wanted
    assert store.referenced_digests() >= {digest("used"), digest("unused"), digest("notes"), ckpt(job.id, 10).sha256}

    # The same through the Keeper (retention + gc) on this database, with real blobs.
    blobs = LocalBlobStore(tmp_path / "artifacts")
    for a in store.list_artifacts(job.id) + store.list_artifacts(other.id) + store.list_artifacts(0):
        data = a.sha256.encode()
        blobs.put([data], hashlib.sha256(data).hexdigest(), len(data))
    keeper = Keeper(store, blobs, code_grace_s=0.0)
    store.cancel(job.id, "test")  # final: keep 2
    dry = keeper.collect(dry_run=True)
    assert dry.artifacts_removed == 3 and len(store.list_artifacts(job.id)) == 5
    real = keeper.collect()
    assert real.artifacts_removed == 3
    assert [a.step for a in store.list_artifacts(job.id, CHECKPOINT)] == [30, 40]
    assert [a.sha256 for a in store.list_artifacts(0)] == [digest("used")]
    assert keeper.collect().artifacts_removed == 0


def test_two_servers_uploading_one_name_at_once_end_with_one_record(db_url):
    """Two store instances (separate engines and pools, as two servers on one database)
    record the same (experiment, name) at the same moment, many times over: each call
    succeeds, one record remains, and it is one of the two."""
    with open_store(db_url) as s:
        x = s.create_experiment("x", {"name": "x"})
    stores = [SqlAlchemyStore(db_url) for _ in range(2)]
    try:
        for i in range(25):
            same_code = Artifact(0, digest(f"tree{i}"), CODE, digest(f"tree{i}"), 7)
            results = race([lambda s=s: s.put_artifact(same_code) for s in stores])
            assert not [r for r in results if isinstance(r, BaseException)], results
            versions = [Artifact(x.id, f"model-{i}.pt", FILE, digest(f"{i}-{k}"), 10 + k, attempt=1) for k in range(2)]
            results = race([lambda s=s, a=a: s.put_artifact(a) for s, a in zip(stores, versions)])
            assert not [r for r in results if isinstance(r, BaseException)], results
            [rec] = [r for r in stores[0].list_artifacts(x.id) if r.name == f"model-{i}.pt"]
            assert rec.sha256 in {v.sha256 for v in versions}
            # Whichever came second learnt which bytes it replaced (to free them).
            replaced = [r[1] for r in results if r[1] is not None]
            assert len(replaced) <= 1 and set(replaced) <= {v.sha256 for v in versions} - {rec.sha256}
        assert len(stores[1].list_artifacts(0)) == 25 and len(stores[1].list_artifacts(x.id)) == 25
    finally:
        for s in stores:
            s.close()


# ---------------------------------------------------------------- log lines


def lines(indexes, text="line {i}", stream=1) -> list[LogLine]:
    return [LogLine(1, i, stream, 1.5 + i, text.format(i=i)) for i in indexes]


def _running(store, name="x"):
    x = store.create_experiment(name, {"name": name})
    claimed = store.claim_next("w1", 0)
    assert claimed.id == x.id
    return claimed


def test_log_lines_are_stored_once_bounded_and_read_by_attempt_and_tail(store):
    x = _running(store)
    assert [ln.index for ln in store.add_logs(x.id, 1, lines(range(1, 6)))] == [1, 2, 3, 4, 5]
    # A resend overlapping what is stored: only the new lines, the first text kept.
    new = store.add_logs(x.id, 1, lines(range(3, 9), "resent {i}") + lines([8, 0, -1]))
    assert [ln.index for ln in new] == [6, 7, 8]
    assert store.add_logs(x.id, 1, lines(range(1, 9))) == []
    got = store.read_logs(x.id)
    assert [(ln.attempt, ln.index) for ln in got] == [(1, i) for i in range(1, 9)]
    assert [ln.text for ln in got[:5]] == [f"line {i}" for i in range(1, 6)] and got[5].text == "resent 6"
    assert got[0].wall_time == 2.5 and got[0].stream == 1
    long = "é" * 20_000  # 40 kB of UTF-8: cut to 16 KiB, whole characters, with a marker
    [cut] = store.add_logs(x.id, 1, [LogLine(1, 9, 9, 0.0, long)])
    stored = store.read_logs(x.id, after=(1, 8))[0]
    assert stored.text == cut.text and len(stored.text.encode()) <= 16 * 1024 and "line cut" in stored.text
    assert stored.stream == 1  # an unknown stream is read as STDOUT

    # The next attempt: the old one is fenced; reads by attempt and by tail.
    store.requeue(x.id, 1, "lost")
    assert store.claim_next("w2", 0).attempt == 2
    with pytest.raises(StaleAttempt):
        store.add_logs(x.id, 1, lines([10]))
    store.add_logs(x.id, 2, lines(range(1, 4), "a2 {i}"))
    assert [ln.text for ln in store.read_logs(x.id, attempt=2)] == ["a2 1", "a2 2", "a2 3"]
    assert store.log_tail_key(x.id, 4) == (1, 8)  # read after it: the last four lines
    tail = store.read_logs(x.id, after=store.log_tail_key(x.id, 4))
    assert [(ln.attempt, ln.index) for ln in tail] == [(1, 9), (2, 1), (2, 2), (2, 3)]
    assert [ln.index for ln in store.read_logs(x.id, attempt=2, after=store.log_tail_key(x.id, 2, attempt=2))] == [2, 3]
    assert [ln.index for ln in store.read_logs(x.id, limit=3)] == [1, 2, 3]
    assert store.log_state(x.id) == {"stored": 12, "dropped": 0, "floor": (0, 0)} and store.count_logs(x.id) == 12

    # The bound: the oldest go, counted; a late resend of a dropped line is not stored again.
    store.add_logs(x.id, 2, lines(range(4, 12), "a2 {i}"), max_lines=10)
    assert store.log_state(x.id) == {"stored": 10, "dropped": 10, "floor": (2, 1)}
    assert store.count_logs(x.id) == 10
    assert [(ln.attempt, ln.index) for ln in store.read_logs(x.id)] == [(2, i) for i in range(2, 12)]
    assert store.add_logs(x.id, 2, lines([1]), max_lines=10) == []
    assert store.log_state(x.id)["dropped"] == 10
    with pytest.raises(NotFound):
        store.add_logs(999, 1, lines([1]))
    with pytest.raises(NotFound):
        store.log_state(999)


def test_concurrent_log_inserters_store_each_line_once(db_url):
    """Two store instances (two servers, or a worker's resend racing its first send)
    insert overlapping batches of one run's lines at once: every line once, each
    reported new by exactly one of them, and the bound's bookkeeping exact."""
    with open_store(db_url) as s:
        x = _running(s)
        y = s.create_experiment("y", {"name": "y"})
        assert s.claim_next("w2", 0).id == y.id
    stores = [SqlAlchemyStore(db_url) for _ in range(2)]
    try:
        reported: list[int] = []
        for start in range(1, 400, 40):  # overlapping windows, sent by both
            batch = range(start, start + 60)
            results = race([lambda s=s: s.add_logs(x.id, 1, lines(batch)) for s in stores])
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, errors
            reported += [ln.index for r in results for ln in r]
        assert sorted(reported) == list(range(1, 421)), "a line reported new twice, or never"
        assert [ln.index for ln in stores[0].read_logs(x.id, limit=1000)] == list(range(1, 421))
        assert stores[1].log_state(x.id) == {"stored": 420, "dropped": 0, "floor": (0, 0)}

        # Bounded while racing: stored + dropped counts every distinct line exactly once.
        for start in range(1, 200, 20):
            batch = range(start, start + 30)
            results = race([lambda s=s: s.add_logs(y.id, 1, lines(batch), max_lines=50) for s in stores])
            assert not [r for r in results if isinstance(r, BaseException)], results
        st = stores[0].log_state(y.id)
        assert st["stored"] == 50 == stores[0].count_logs(y.id)
        assert st["stored"] + st["dropped"] == 210 and st["floor"] == (1, 160)
        assert [ln.index for ln in stores[1].read_logs(y.id, limit=1000)] == list(range(161, 211))
    finally:
        for s in stores:
            s.close()


# ---------------------------------------------------------------- a server process on PostgreSQL


def _server(tmp_path, db_url: str, *extra: str) -> tuple[Proc, str]:
    address = f"127.0.0.1:{free_port()}"
    proc = Proc(["server", "--listen", address, "--db", db_url, "--artifacts", str(tmp_path / "artifacts"), *extra],
                tmp_path / f"server-{time.monotonic_ns()}.log")
    wait_healthy(address, proc, timeout=120)
    return proc, address


@pytest.mark.slow
def test_artifacts_service_end_to_end_on_postgresql(pg_url, tmp_path):
    import grpc

    from trainctl import artifact_io
    from trainctl.client import Client
    from trainctl.v1 import trainctl_pb2 as pb
    from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

    code = tmp_path / "proj"
    code.mkdir()
    (code / "train.py").write_text("print('hello from the fleet')\n")
    proc, address = _server(tmp_path, pg_url)
    try:
        with Client(address) as c:
            up = c.upload_code(code)
            assert up.uploaded and c.upload_code(code).uploaded is False  # the same tree: sent once
            x = c.submit({"name": "job", "command": "python train.py", "keep_checkpoints": 2},
                         code_sha256=up.sha256)
            assert (x.state, x.kind) == ("QUEUED", "CODE")
            [rec] = c.artifacts(0)
            assert (rec.kind, rec.sha256, rec.size) == ("code", up.sha256, up.size)

            # An attached run stores checkpoints (retention: the default 3) and a file.
            with grpc.insecure_channel(address) as ch:
                a = pb_grpc.ExperimentsStub(ch).Attach(pb.AttachRequest(name="saver"), timeout=30)
                stub = pb_grpc.ArtifactsStub(ch)
                f = tmp_path / "blob"
                for step in (1, 2, 3, 4, 5):
                    f.write_bytes(f"checkpoint {step}".encode() * 1000)
                    artifact_io.upload(stub, f, pb.Artifact(kind=pb.ARTIFACT_CHECKPOINT, experiment_id=a.experiment.id,
                                                            attempt=a.attempt, step=step, name=f"ckpt-{step}.pt"),
                                       run_token=a.run_token, timeout=30)
                f.write_bytes(b"results" * 999)
                artifact_io.upload(stub, f, pb.Artifact(kind=pb.ARTIFACT_FILE, experiment_id=a.experiment.id,
                                                        attempt=a.attempt, name="results.csv"),
                                   run_token=a.run_token, timeout=30)
            listed = c.artifacts(a.experiment.id)
            assert [(r.kind, r.step) for r in listed] == [("checkpoint", 3), ("checkpoint", 4), ("checkpoint", 5),
                                                          ("file", 0)]
            [(info, path)] = c.download(a.experiment.id, "results.csv", tmp_path / "got")
            assert path.read_bytes() == b"results" * 999 and info.sha256 == hashlib.sha256(b"results" * 999).hexdigest()
            assert c.gc(dry_run=True)["artifacts_removed"] == 0
            assert c.gc()["blobs_removed"] == 0  # retention already freed the old checkpoints' blobs
            blobs = sorted(p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file() and len(p.name) == 64)
            assert blobs == sorted({up.sha256, *(r.sha256 for r in listed)})
    finally:
        proc.stop()
    assert "Traceback" not in proc.output(), proc.output()
    # What the server recorded is in PostgreSQL, for any other server on it.
    with open_store(pg_url) as s:
        assert s.get_experiment(x.id).spec["code_sha256"] == up.sha256
        assert [r.step for r in s.list_artifacts(a.experiment.id, CHECKPOINT)] == [3, 4, 5]


# ---------------------------------------------------------------- PostgreSQL outage


@pytest.fixture
def own_pg(pg_server):
    """A PostgreSQL server of this test's own (the session's is shared: never stop it)."""
    from tests.pg import PostgresServer

    server = PostgresServer(pg_server.bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _wait_epoch(c, exp_id: int, epoch: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for ev in c.watch(exp_id, live_only=True):
        if ev.kind == "epoch" and ev.epoch >= epoch:
            return
        assert time.monotonic() < deadline, f"experiment {exp_id} did not reach epoch {epoch}"
    raise AssertionError(f"experiment {exp_id} ended before epoch {epoch}")


def _cluster_pids(pg) -> list[int]:
    """The postmaster and every process it started."""
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
def test_postgresql_stopped_then_frozen_past_the_lease_loses_nothing_and_spends_no_restart(own_pg, tmp_path, monkeypatch):
    from trainctl.client import Client
    from trainctl.client.sdk import TrainctlError

    monkeypatch.setenv("TRAINCTL_LOG", "INFO")
    db_url = own_pg.url()
    server, address = _server(tmp_path, db_url, "--heartbeat", "0.5", "--lease-timeout", "3")
    worker = Proc(["worker", "--server", address, "--worker-id", "w0", "--workdir", str(tmp_path / "runs")],
                  tmp_path / "worker-w0.log")
    logs = lambda: f"==== server\n{server.output()[-6000:]}\n==== worker\n{worker.output()[-4000:]}"  # noqa: E731
    try:
        c = Client(address, timeout=30)
        # Tiny (test_resnet): the box is shared and slow. A run that ends during the outage
        # is still a fair test: its results must get through once the database is back.
        x = c.submit(digits_spec("pg-down", model={"name": "test_resnet"},
                                 train={"epochs": 4, "seed": 0, "max_steps_per_epoch": 4}))
        _wait_epoch(c, x.id, 0)
        c.close()

        own_pg._run("pg_ctl", "-D", str(own_pg.data), "-m", "fast", "-w", "stop")
        t_down = time.monotonic()
        with Client(address, timeout=30) as c:
            with pytest.raises(TrainctlError) as err:
                c.get(x.id)
            assert err.value.code == "UNAVAILABLE", err.value
            msg = err.value.message
            assert msg.startswith("the database is unavailable (get_experiment: ") and msg.endswith("; try again"), msg
            assert "[SQL" not in msg and "psycopg" not in msg and len(msg) < 400, msg
        time.sleep(max(0.0, t_down + 8.0 - time.monotonic()))  # > 2x the lease: no one can be heard
        own_pg._run("pg_ctl", "-D", str(own_pg.data), "-l", str(own_pg.log), "-w", "-t", "60", "start")

        # Frozen (a hung host, not a refused connection): every process of the cluster stopped.
        pids = _cluster_pids(own_pg)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        t_frozen = time.monotonic()
        try:
            # No driver error to map here: a store call just waits (nothing bounds a query
            # on a hung server), so a client's own deadline answers it.
            with Client(address, timeout=3) as c:
                with pytest.raises(TrainctlError) as err:
                    c.get(x.id)
                assert err.value.code == "DEADLINE_EXCEEDED", err.value
            time.sleep(max(0.0, t_frozen + 8.0 - time.monotonic()))
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

        with Client(address, timeout=30) as c:
            final = c.wait(x.id, timeout=300)
            assert final.state == "COMPLETED", logs()
            assert (final.attempt, final.worker_id) == (1, "w0"), logs()
            assert "lost" not in final.message, final.message
            assert c.logs(x.id), "the run's log lines were not stored"
    finally:
        worker.stop()
        server.stop()
    out = server.output()
    assert "the database is unavailable" in out, out[-6000:]
    assert "requeued" not in out and "Traceback" not in out, out[-6000:]

    # What the database holds: every step once, every epoch, no restart spent.
    with open_store(db_url) as s:
        exp = s.get_experiment(x.id)
        assert (exp.state, exp.attempt, exp.restarts) == ("COMPLETED", 1, 0), "the database's outage cost a restart"
        with s._engine.connect() as conn:
            from sqlalchemy import text

            per_step = conn.execute(text("SELECT step, COUNT(*) FROM metrics WHERE experiment_id=:x AND scope='STEP' "
                                         "AND name='loss' GROUP BY step ORDER BY step"), {"x": x.id}).all()
            epochs = conn.execute(text("SELECT COUNT(*) FROM metrics WHERE experiment_id=:x AND scope='EPOCH' "
                                       "AND name='val_top1'"), {"x": x.id}).scalar_one()
            attempts = conn.execute(text("SELECT DISTINCT attempt FROM metrics WHERE experiment_id=:x"),
                                    {"x": x.id}).scalars().all()
        assert [st for st, _ in per_step] == list(range(16)), "a step is missing"
        assert all(n == 1 for _, n in per_step), "a step is stored twice"
        assert epochs == 4 and attempts == [1]
        st = s.log_state(x.id)
        assert st["stored"] == s.count_logs(x.id) > 0 and st["dropped"] == 0
