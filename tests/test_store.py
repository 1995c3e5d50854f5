"""The store against real databases (no mocks): lifecycle, fencing, metrics, controls,
workers, migrations and the SQLite settings the server relies on.

Every test taking `store` or `store_url` runs twice: on a SQLite file and on a fresh
database of a throwaway PostgreSQL server (tests/pg.py; those cases skip, saying why,
where PostgreSQL's binaries cannot be found)."""

from __future__ import annotations

import math
import sqlite3
import threading

import pytest
from sqlalchemy import text

from trainctl.server.store import (
    ControlRecord,
    InvalidTransition,
    NotFound,
    SchemaTooNew,
    SqlAlchemyStore,
    StaleAttempt,
    open_store,
)

pytest_plugins = ["tests.pg"]  # pg_server / pg_url: a throwaway PostgreSQL server

NAN = float("nan")


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "trainctl.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, db_path):
    """URL of an empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{db_path}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def running(store, name="exp", **kw):
    """An experiment claimed by worker w1 and RUNNING (attempt 1)."""
    exp = store.create_experiment(name, {"model": {"name": "resnet10t"}}, **kw)
    claimed = store.claim_next("w1", free_gpus=8)
    assert claimed.id == exp.id
    return store.transition(exp.id, claimed.attempt, "RUNNING")


# ---------------------------------------------------------------- experiments


def test_create_get_list(store):
    a = store.create_experiment("a", {"lr": 0.1}, max_restarts=5, gpus=2)
    b = store.create_experiment("b", {}, replay_of=a.id)
    assert (a.state, a.attempt, a.worker_id, a.restarts, a.last_step) == ("QUEUED", 0, None, 0, 0)
    assert (a.max_restarts, a.gpus, a.spec, a.summary, a.is_final) == (5, 2, {"lr": 0.1}, {}, False)
    assert b.replay_of == a.id
    assert store.get_experiment(a.id) == a
    assert [e.id for e in store.list_experiments()] == [b.id, a.id]  # newest first
    assert [e.id for e in store.list_experiments(limit=1)] == [b.id]
    store.cancel(a.id, "no")
    assert [e.id for e in store.list_experiments(states=["CANCELLED"])] == [a.id]
    assert [e.id for e in store.list_experiments(states=["QUEUED", "RUNNING"])] == [b.id]


def test_not_found_names_the_id(store):
    with pytest.raises(NotFound, match=r"^experiment 7 not found$"):
        store.get_experiment(7)
    with pytest.raises(NotFound, match="experiment 7 not found"):
        store.get_metrics(7)
    with pytest.raises(NotFound, match="control command nope of experiment 7 not found"):
        store.resolve_control(7, "nope", status="APPLIED")


def test_claim_is_fifo_and_respects_gpus(store):
    big = store.create_experiment("big", {}, gpus=4)
    small1 = store.create_experiment("small1", {}, gpus=1)
    small2 = store.create_experiment("small2", {}, gpus=0)

    got = store.claim_next("w1", free_gpus=1)
    assert (got.id, got.state, got.attempt, got.worker_id) == (small1.id, "ASSIGNED", 1, "w1")
    assert store.claim_next("w2", free_gpus=0).id == small2.id
    assert store.claim_next("w2", free_gpus=3) is None  # big needs 4
    assert store.claim_next("w3", free_gpus=4).id == big.id
    assert store.claim_next("w3", free_gpus=8) is None


def test_concurrent_claims_take_each_experiment_once(store_url, store):
    ids = [store.create_experiment(f"e{i}", {}).id for i in range(60)]
    # Two store objects on one database behave like two server processes: no shared
    # in-process lock, only SQLite's BEGIN IMMEDIATE or PostgreSQL's row locks (FOR
    # UPDATE SKIP LOCKED) keep them apart.
    other = SqlAlchemyStore(store_url)
    claimed: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(n):
        s = store if n % 2 else other
        try:
            start.wait()
            while (exp := s.claim_next(f"w{n}", free_gpus=0)) is not None:
                claimed.append((exp.worker_id, exp.id))
        except BaseException as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()

    assert not errors
    assert sorted(i for _, i in claimed) == ids
    for worker_id, id in claimed:
        exp = store.get_experiment(id)
        assert (exp.state, exp.attempt, exp.worker_id) == ("ASSIGNED", 1, worker_id)


def test_transitions(store):
    exp = store.create_experiment("e", {})
    with pytest.raises(StaleAttempt):  # never claimed: no live run to speak for it
        store.transition(exp.id, 0, "RUNNING")
    store.claim_next("w1", 0)
    run = store.transition(exp.id, 1, "RUNNING")
    assert run.state == "RUNNING" and run.started_at is not None and run.finished_at is None
    assert store.transition(exp.id, 1, "RUNNING") == run  # resent update: no-op
    with pytest.raises(InvalidTransition, match=rf"^experiment {exp.id} is RUNNING; cannot move to QUEUED$"):
        store.transition(exp.id, 1, "QUEUED")

    done = store.transition(exp.id, 1, "COMPLETED", message="ok", summary={"val_top1": 0.9, "steps": 100})
    assert done.is_final and done.finished_at >= done.started_at
    assert (done.message, done.summary) == ("ok", {"val_top1": 0.9, "steps": 100.0})
    with pytest.raises(InvalidTransition, match=rf"experiment {exp.id} is COMPLETED; cannot move to RUNNING"):
        store.transition(exp.id, 1, "RUNNING")
    with pytest.raises(InvalidTransition, match="is COMPLETED; cannot move to CANCELLED"):
        store.cancel(exp.id, "too late")

    # ASSIGNED may fail straight away (bad spec on the worker).
    other = store.create_experiment("f", {})
    store.claim_next("w1", 0)
    assert store.transition(other.id, 1, "FAILED", message="boom").state == "FAILED"


def test_cancel(store):
    queued = store.create_experiment("q", {})
    c = store.cancel(queued.id, "user asked")
    assert (c.state, c.message, c.is_final) == ("CANCELLED", "user asked", True)
    run = running(store)
    c = store.cancel(run.id, "stop")
    assert c.worker_id == "w1"  # kept: the server must tell that worker to stop
    # The worker's acknowledgement of the cancel is accepted as a no-op.
    assert store.transition(run.id, 1, "CANCELLED").state == "CANCELLED"


def test_fencing(store):
    run = running(store)
    with pytest.raises(StaleAttempt, match=rf"^experiment {run.id}: attempt 2 is fenced \(current attempt 1\)$"):
        store.transition(run.id, 2, "COMPLETED")
    store.requeue(run.id, 1, "lease expired")
    # Same attempt number, but its lease was revoked: still fenced.
    with pytest.raises(StaleAttempt, match=rf"experiment {run.id}: attempt 1 is fenced"):
        store.add_metrics(run.id, 1, "STEP", ["loss"], [(1, 0, 0.0, [1.0])])
    with pytest.raises(StaleAttempt):
        store.transition(run.id, 1, "RUNNING")
    again = store.claim_next("w2", 0)
    assert again.attempt == 2
    with pytest.raises(StaleAttempt, match=r"attempt 1 is fenced \(current attempt 2\)"):
        store.transition(run.id, 1, "COMPLETED")
    assert store.transition(run.id, 2, "RUNNING").started_at == run.started_at  # first start kept


def test_requeue_counts_restarts_then_gives_up(store):
    exp = running(store, max_restarts=2)
    for attempt in (1, 2):
        r = store.requeue(exp.id, attempt, "lease expired")
        assert (r.state, r.restarts, r.worker_id, r.attempt) == ("QUEUED", attempt, None, attempt)
        assert store.claim_next("w1", 0).attempt == attempt + 1

    # A graceful hand-back (worker SIGTERM) does not use up a restart.
    r = store.requeue(exp.id, 3, "worker shutting down", count_restart=False)
    assert (r.state, r.restarts) == ("QUEUED", 2)
    store.claim_next("w1", 0)

    failed = store.requeue(exp.id, 4, "lease expired")
    assert failed.state == "FAILED" and failed.is_final
    assert failed.message == "lease expired; gave up after 2 restarts"
    with pytest.raises(StaleAttempt):  # the run that lost its lease stays fenced
        store.transition(exp.id, 4, "COMPLETED")


# ---------------------------------------------------------------- metrics


def test_add_metrics_idempotent_and_skips_nan(store):
    exp = running(store)
    names = ["loss", "lr"]
    rows = [(1, 0, 10.0, [2.0, 0.1]), (2, 0, 11.0, [1.5, NAN]), (3, 0, 12.0, [NAN, NAN])]
    assert store.add_metrics(exp.id, 1, "STEP", names, rows) == 3
    assert store.add_metrics(exp.id, 1, "STEP", names, rows) == 3  # resent batch
    assert store.count_metrics(exp.id) == 3
    # last_step counts stored points only; the all-NaN row at step 3 stored nothing.
    assert store.get_experiment(exp.id).last_step == 2
    store.add_metrics(exp.id, 1, "EPOCH", ["val_top1"], [(2, 0, 12.0, [0.5])])
    assert store.count_metrics(exp.id) == 4
    assert store.add_metrics(exp.id, 1, "STEP", names, []) == 0
    with pytest.raises(ValueError, match="scope"):
        store.add_metrics(exp.id, 1, "BATCH", names, rows)


def test_later_attempt_replaces_points(store):
    exp = running(store)
    store.add_metrics(exp.id, 1, "STEP", ["loss"], [(1, 0, 1.0, [3.0]), (2, 0, 2.0, [2.0])])
    store.requeue(exp.id, 1, "lease expired")
    store.claim_next("w2", 0)
    # Resumed from a checkpoint at step 1: step 2 is recomputed, step 3 is new.
    store.add_metrics(exp.id, 2, "STEP", ["loss"], [(2, 0, 5.0, [2.5]), (3, 0, 6.0, [1.0])])
    (loss,) = store.get_metrics(exp.id)
    assert (loss.steps, loss.values) == ([1, 2, 3], [3.0, 2.5, 1.0])
    assert store.count_metrics(exp.id) == 3
    assert store.get_experiment(exp.id).last_step == 3
    with pytest.raises(StaleAttempt, match="attempt 1 is fenced"):
        store.add_metrics(exp.id, 1, "STEP", ["loss"], [(2, 0, 9.0, [9.0])])


def test_get_metrics_filters(store):
    exp = running(store)
    store.add_metrics(
        exp.id, 1, "STEP", ["loss", "lr"], [(s, s // 10, float(s), [1.0 / s, 0.1]) for s in range(1, 31)]
    )
    store.add_metrics(exp.id, 1, "EPOCH", ["loss", "val_top1"], [(10, 0, 10.0, [0.5, 0.3]), (20, 1, 20.0, [0.4, 0.6])])

    series = store.get_metrics(exp.id)
    assert [(s.name, s.scope, len(s.steps)) for s in series] == [
        ("loss", "EPOCH", 2),
        ("loss", "STEP", 30),
        ("lr", "STEP", 30),
        ("val_top1", "EPOCH", 2),
    ]
    assert series[1].steps == list(range(1, 31)) and series[1].epochs[:11] == [0] * 9 + [1, 1]

    (lr,) = store.get_metrics(exp.id, names=["lr"], from_step=5, to_step=8)
    assert (lr.steps, lr.values) == ([5, 6, 7, 8], [0.1] * 4)  # to_step is inclusive
    epoch = store.get_metrics(exp.id, scope="EPOCH", from_step=15)
    assert [(s.name, s.steps, s.epochs, s.values) for s in epoch] == [
        ("loss", [20], [1], [0.4]),
        ("val_top1", [20], [1], [0.6]),
    ]
    assert store.get_metrics(exp.id, names=["nope"]) == []


def test_metric_rows_groups_by_scope_and_step(store):
    exp = running(store)
    store.add_metrics(exp.id, 1, "EPOCH", ["val_top1"], [(2, 0, 3.0, [0.5])])
    store.add_metrics(exp.id, 1, "STEP", ["loss", "lr"], [(1, 0, 1.0, [2.0, 0.1]), (2, 0, 2.0, [1.0, NAN])])
    store.add_metrics(exp.id, 1, "STEP", ["loss", "lr"], [(3, 1, 4.0, [0.5, 0.05])])

    rows = store.metric_rows(exp.id)
    assert [(r.scope, r.step, r.epoch, r.wall_time, r.values) for r in rows] == [
        ("STEP", 1, 0, 1.0, {"loss": 2.0, "lr": 0.1}),
        ("STEP", 2, 0, 2.0, {"loss": 1.0}),
        ("EPOCH", 2, 0, 3.0, {"val_top1": 0.5}),  # after the step row of the same step
        ("STEP", 3, 1, 4.0, {"loss": 0.5, "lr": 0.05}),
    ]
    assert [(r.scope, r.step) for r in store.metric_rows(exp.id, from_step=2, to_step=2)] == [
        ("STEP", 2),
        ("EPOCH", 2),
    ]
    assert [(r.scope, r.step) for r in store.metric_rows(exp.id, scope="EPOCH")] == [("EPOCH", 2)]


# ---------------------------------------------------------------- controls


def test_controls_add_resolve_list(store):
    exp = running(store)
    live = store.add_control(ControlRecord("c-live", exp.id, "SET_LR", 0.01))
    assert (live.status, live.source, live.applied_step) == ("PENDING", "LIVE", None)
    assert live.requested_at > 0
    # A client retrying with the same command_id (and content) gets the original record back.
    assert store.add_control(ControlRecord("c-live", exp.id, "SET_LR", 0.01, requested_at=9.0)) == live
    store.add_control(
        ControlRecord("c-sched", exp.id, "SET_LR_DECAY", 0.5, source="SCHEDULED", requested_at=1.0, at_step=50)
    )
    store.add_control(ControlRecord("c-pending", exp.id, "SET_EMA_DECAY", 0.999, requested_at=2.0))

    applied = store.resolve_control(exp.id, "c-live", status="APPLIED", applied_step=20, old_value=0.1,
                                    new_value=0.01, consequence="cosine continues")
    assert (applied.status, applied.applied_step, applied.old_value, applied.new_value) == ("APPLIED", 20, 0.1, 0.01)
    assert applied.applied_at is not None and applied.consequence == "cosine continues"
    # A duplicate ack does not rewrite the audited answer.
    assert store.resolve_control(exp.id, "c-live", status="REJECTED", message="late") == applied

    # By (applied_step or at_step), then requested_at; not yet placed ones last.
    assert [c.command_id for c in store.list_controls(exp.id)] == ["c-live", "c-sched", "c-pending"]
    assert [c.command_id for c in store.list_controls(exp.id, status="PENDING")] == ["c-sched", "c-pending"]

    with pytest.raises(ValueError, match="kind"):
        store.add_control(ControlRecord("bad", exp.id, "SET_MOMENTUM", 0.9))
    with pytest.raises(NotFound, match="experiment 999 not found"):
        store.add_control(ControlRecord("c-x", 999, "SET_LR", 0.1))


# ---------------------------------------------------------------- workers


def test_workers(store):
    w = store.upsert_worker("w1", "host-a", [{"kind": "cuda", "index": 0, "name": "H100"}])
    assert (w.hostname, w.connected, w.devices[0]["name"]) == ("host-a", True, "H100")
    store.upsert_worker("w0", "host-b", [])
    assert store.mark_worker("w1", False).connected is False
    assert [(x.id, x.connected) for x in store.list_workers()] == [("w0", True), ("w1", False)]
    assert store.upsert_worker("w1", "host-c", []).connected is True
    with pytest.raises(NotFound, match="worker ghost not found"):
        store.mark_worker("ghost", True)


# ---------------------------------------------------------------- database


def test_fresh_db_is_at_head_and_matches_models(store, store_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from trainctl.server.store.migrate import alembic_config
    from trainctl.server.store.tables import metadata

    heads = ScriptDirectory.from_config(alembic_config(store_url)).get_heads()
    with store._engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == heads
        # The migrations and tables.py describe the same schema.
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_newer_schema_is_refused(store_url):
    with open_store(store_url) as s, s._engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
    with pytest.raises(SchemaTooNew, match=r"revision 0099_future is newer than this trainctl knows \(head \d{4}\)"):
        open_store(store_url)


def test_sqlite_settings(db_path):
    store = open_store(f"sqlite:///{db_path}")
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    store.close()


def test_data_survives_reopen(store_url, db_path):
    # A bare path means a SQLite file.
    s = open_store(str(db_path) if store_url.startswith("sqlite") else store_url)
    exp = running(s)
    s.add_metrics(exp.id, 1, "STEP", ["loss"], [(1, 0, 1.0, [math.pi])])
    s.add_control(ControlRecord("c1", exp.id, "SCALE_LR", 0.5))
    s.upsert_worker("w1", "h", [])
    before = s.get_experiment(exp.id)
    s.close()

    s = open_store(store_url)
    assert s.get_experiment(exp.id) == before
    assert s.get_metrics(exp.id)[0].values == [math.pi]
    assert s.list_controls(exp.id)[0].command_id == "c1"
    assert [w.id for w in s.list_workers()] == ["w1"]
    s.close()


def test_in_memory_store():
    with open_store("sqlite://") as s:
        exp = running(s)
        assert s.add_metrics(exp.id, 1, "STEP", ["loss"], [(1, 0, 1.0, [1.0])]) == 1
        assert s.count_metrics(exp.id) == 1


# ---------------------------------------------------------------- downsampled reads (rollup)

BLOCK = 64  # series.BLOCK_STEPS, restated: the expectations below are computed independently


def _raw_points(store, exp_id):
    """{(name, scope): [(step, epoch, value), ...]} straight from the metrics table."""
    out: dict = {}
    with store._engine.connect() as conn:
        for name, scope, step, epoch, value in conn.execute(
            text("SELECT name, scope, step, epoch, value FROM metrics WHERE experiment_id = :e "
                 "ORDER BY name, scope, step"), {"e": exp_id}
        ):
            out.setdefault((name, scope), []).append((step, epoch, value))
    return out


def _blocks_of(points):
    """Raw points split into blocks of BLOCK steps (non-empty ones, in step order)."""
    blocks: dict = {}
    for p in points:
        blocks.setdefault(p[0] // BLOCK, []).append(p)
    return [blocks[b] for b in sorted(blocks)]


def _lo(points):  # the minimum point: smallest value, earliest step on ties
    return min(points, key=lambda p: (p[2], p[0]))


def _hi(points):  # the maximum point: largest value, earliest step on ties
    return min(points, key=lambda p: (-p[2], p[0]))


def _expected(points, max_points, from_step=0, to_step=None):
    """What a downsampled read must answer, computed from the raw points: the first and
    last points, and the min and max of each of (max_points - 2) // 2 groups of
    consecutive blocks (the edge blocks clipped to the range); with fewer blocks than
    that, downsample_minmax over the points."""
    # from_step 0 means "from the start", as everywhere in the store.
    pts = [p for p in points if (not from_step or p[0] >= from_step) and (to_step is None or p[0] <= to_step)]
    if len(pts) <= max_points:
        return pts
    units = _blocks_of(pts)
    n_groups, m = (max_points - 2) // 2, len(units)
    if m < n_groups + 4:  # too few blocks for the groups: point by point instead
        from trainctl.server.downsample import downsample_minmax

        epoch_of = {p[0]: p[1] for p in pts}
        steps, values = downsample_minmax([p[0] for p in pts], [p[2] for p in pts], max_points)
        return [(st, epoch_of[st], v) for st, v in zip(steps, values)]
    out = []
    for g in range(n_groups):
        group = [p for u in units[g * m // n_groups:(g + 1) * m // n_groups] for p in u]
        lo, hi = _lo(group), _hi(group)
        out += [lo] if lo == hi else sorted([lo, hi])
    if max_points == 1:
        return [pts[0]]
    if not out or out[0] != pts[0]:
        out.insert(0, pts[0])
    if out[-1] != pts[-1]:
        out.append(pts[-1])
    return out


def _rollup_matches_raw(store, exp_id):
    raw = {(name, scope, blk[0][0] // BLOCK): blk
           for (name, scope), points in _raw_points(store, exp_id).items() for blk in _blocks_of(points)}
    with store._engine.connect() as conn:
        stored = {
            (r.name, r.scope, r.block): r
            for r in conn.execute(text("SELECT * FROM metric_blocks WHERE experiment_id = :e"), {"e": exp_id})
        }
    assert stored.keys() == raw.keys()
    for key, blk in raw.items():
        r = stored[key]
        assert (r.n, r.last_step) == (len(blk), blk[-1][0]), key
        assert (r.min_step, r.min_epoch, r.min_value) == _lo(blk), key
        assert (r.max_step, r.max_epoch, r.max_value) == _hi(blk), key


def _series_points(s):
    return list(zip(s.steps, s.epochs, s.values))


def test_downsampled_equals_block_min_max_of_raw_points(store):
    import random

    rng = random.Random(4)
    exp = running(store)
    names = ["loss", "lr"]
    # Values rounded to 1 decimal: plenty of ties, so the tie rule (earliest step) is tested.
    # lr is NaN (not logged) at one step in 7; batches of 37 rows straddle block edges.
    rows = [(s, s // 1000, float(s), [round(rng.gauss(0, 1), 1), NAN if s % 7 == 0 else round(rng.random(), 1)])
            for s in range(20_000)]
    for i in range(0, len(rows), 37):
        store.add_metrics(exp.id, 1, "STEP", names, rows[i:i + 37])
    store.add_metrics(exp.id, 1, "STEP", names, rows[370:407])  # a resent batch
    store.add_metrics(exp.id, 1, "STEP", names, rows[900:800:-1])  # out of order in the batch
    store.add_metrics(exp.id, 1, "EPOCH", ["val_top1"], [(s, s // 1000, 0.0, [s / 1e5]) for s in range(999, 20_000, 1000)])
    # A resumed attempt recomputes steps 5000..5199: a new spike, and the old extremes there go.
    store.requeue(exp.id, 1, "lease expired")
    store.claim_next("w2", 0)
    store.add_metrics(exp.id, 2, "STEP", names, [(s, 5, 0.0, [50.0 if s == 5100 else 0.0, 0.5]) for s in range(5000, 5200)])
    _rollup_matches_raw(store, exp.id)

    raw = _raw_points(store, exp.id)
    for max_points, from_step, to_step in [(100, 0, None), (2000, 0, None), (101, 1234, 17_777), (7, 0, None),
                                           (2, 0, None), (1, 0, None), (60, 5000, 8999)]:
        series, total = store.get_metrics_downsampled(exp.id, max_points, from_step=from_step, to_step=to_step)
        assert total == sum(len([p for p in pts if p[0] >= from_step and (to_step is None or p[0] <= to_step)])
                            for pts in raw.values())
        assert [(s.name, s.scope) for s in series] == [("loss", "STEP"), ("lr", "STEP"), ("val_top1", "EPOCH")]
        for s in series:
            got = _series_points(s)
            assert got == _expected(raw[(s.name, s.scope)], max_points, from_step, to_step), (s.name, max_points)
            assert len(got) <= max_points
    (loss,) = store.get_metrics_downsampled(exp.id, 100, names=["loss"], scope="STEP")[0]
    assert (5100, 5, 50.0) in _series_points(loss)  # the spike survives
    # Without a limit, everything; a short series comes back whole.
    series, total = store.get_metrics_downsampled(exp.id, 0, names=["val_top1"])
    assert len(series[0].steps) == total == 20


def test_downsampled_short_series_uses_points(store):
    from trainctl.server.downsample import downsample_minmax

    exp = running(store)
    store.add_metrics(exp.id, 1, "STEP", ["loss"], [(s, 0, 0.0, [((s * 7919) % 101) / 10]) for s in range(500)])
    (s,), total = store.get_metrics_downsampled(exp.id, 100)
    (full,) = store.get_metrics(exp.id)
    assert total == 500 and (s.steps, s.values) == downsample_minmax(full.steps, full.values, 100)
    assert s.epochs == [0] * len(s.steps)
    assert store.get_metrics_downsampled(exp.id, 100, names=["nope"]) == ([], 0)


def test_migration_fills_rollup_for_existing_points(store_url):
    from alembic import command

    from trainctl.server.store.migrate import alembic_config

    command.upgrade(alembic_config(store_url), "0001")  # a database written before the rollup
    from sqlalchemy import create_engine

    engine = create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO experiments (id, name, state, spec, created_at, attempt, message, summary, last_step, "
            "max_restarts, restarts, gpus) VALUES (1, 'old', 'RUNNING', '{}', 0, 1, '', '{}', 0, 3, 0, 0)"))
        conn.execute(
            text("INSERT INTO metrics VALUES (1, :scope, :step, :epoch, :name, :value, 0, 1)"),
            [{"scope": "STEP", "step": s, "epoch": s // 100, "name": "loss", "value": float((s * 37) % 23)}
             for s in range(-5, 1000)]
            + [{"scope": "EPOCH", "step": s, "epoch": s // 100, "name": "loss", "value": 1.0} for s in (99, 199)],
        )
    engine.dispose()
    with open_store(store_url) as s:
        _rollup_matches_raw(s, 1)
        (loss,), total = s.get_metrics_downsampled(1, 10, scope="STEP")
        assert total == 1005 and _series_points(loss) == _expected(_raw_points(s, 1)[("loss", "STEP")], 10)


# ---------------------------------------------------------------- issue 10: paging, command ids, expiry


def test_list_pages_by_key(store):
    ids = [store.create_experiment(f"e{i}", {}).id for i in range(5)]
    first = store.list_experiments(limit=2)
    assert [x.id for x in first] == ids[:-3:-1]
    second = store.list_experiments(limit=2, before_id=first[-1].id)
    assert [x.id for x in second] == [ids[2], ids[1]]
    assert [x.id for x in store.list_experiments(limit=2, before_id=ids[0])] == []
    store.cancel(ids[3], "x")
    assert [x.id for x in store.list_experiments(["QUEUED"], 10, before_id=ids[4])] == [ids[2], ids[1], ids[0]]
    assert store.count_by_state() == {"QUEUED": 4, "CANCELLED": 1}


def test_command_ids_are_scoped_per_experiment(store):
    from trainctl.server.store.errors import AlreadyExists

    a, b = running(store, "a"), store.create_experiment("b", {})
    ra = store.add_control(ControlRecord("same", a.id, "SET_LR", 0.01))
    rb = store.add_control(ControlRecord("same", b.id, "SCALE_LR", 0.5))  # another experiment: another command
    assert (ra.experiment_id, ra.kind, rb.experiment_id, rb.kind) == (a.id, "SET_LR", b.id, "SCALE_LR")
    assert store.add_control(ControlRecord("same", a.id, "SET_LR", 0.01)) == ra  # idempotent retry
    with pytest.raises(AlreadyExists, match=rf"command 'same' of experiment {a.id} already exists as SET_LR 0.01"):
        store.add_control(ControlRecord("same", a.id, "SET_LR", 0.02))
    with pytest.raises(AlreadyExists):
        store.add_control(ControlRecord("same", a.id, "SET_LR", 0.01, hold=True))
    # An ack for a's command resolves a's record only; b's is untouched.
    done = store.resolve_control(a.id, "same", status="APPLIED", applied_step=3)
    assert (done.experiment_id, done.status) == (a.id, "APPLIED")
    assert store.list_controls(b.id)[0].status == "PENDING"
    with pytest.raises(NotFound):
        store.resolve_control(b.id, "other", status="APPLIED")


def test_pending_commands_expire_when_the_run_ends(store):
    # COMPLETED: a live command never acked and a scheduled one whose step never came.
    done = running(store, "done")
    store.add_metrics(done.id, 1, "STEP", ["loss"], [(s, 0, 0.0, [1.0]) for s in range(10)])
    store.add_control(ControlRecord("live", done.id, "SET_LR", 0.1))
    store.add_control(ControlRecord("sched", done.id, "SET_LR", 0.1, source="SCHEDULED", at_step=50))
    applied = store.add_control(ControlRecord("ok", done.id, "SET_LR", 0.2))
    store.resolve_control(done.id, "ok", status="APPLIED", applied_step=2)
    store.transition(done.id, 1, "COMPLETED")
    recs = {r.command_id: r for r in store.list_controls(done.id)}
    assert recs["ok"].status == "APPLIED" and recs["ok"].applied_at >= applied.requested_at
    assert (recs["live"].status, recs["live"].message) == ("EXPIRED", "the run ended COMPLETED at step 9 before it applied")
    assert recs["sched"].message == "the run ended COMPLETED at step 9 before step 50 was reached"
    assert recs["live"].applied_at is not None
    assert store.list_controls(done.id, status="PENDING") == []

    # CANCELLED (client) and FAILED (requeue giving up) too; QUEUED again keeps them PENDING.
    c = store.create_experiment("c", {})
    store.add_control(ControlRecord("x", c.id, "SCALE_LR", 0.5))
    store.cancel(c.id, "no")
    assert store.list_controls(c.id)[0].status == "EXPIRED"
    f = running(store, "f", max_restarts=1)
    store.add_control(ControlRecord("y", f.id, "SCALE_LR", 0.5))
    store.requeue(f.id, 1, "lost")
    assert store.list_controls(f.id)[0].status == "PENDING"
    store.claim_next("w1", 0)
    assert store.requeue(f.id, 2, "lost").state == "FAILED"
    assert store.list_controls(f.id)[0].message == "the run ended FAILED at step 0 before it applied"
    # A command that races with the end is stored ended, never PENDING forever.
    late = store.add_control(ControlRecord("late", f.id, "SET_LR", 0.1))
    assert late.status == "EXPIRED"


def test_delivered_is_the_stored_prefix(store):
    exp = running(store)
    assert store.delivered(exp.id) == (0, 0)
    steps = [s for s in range(300) if s not in (200, 250)]  # 3 whole blocks of 64, a gap at 200
    store.add_metrics(exp.id, 1, "STEP", ["loss", "lr"], [(s, s // 100, 0.0, [1.0, 0.1]) for s in steps])
    store.add_metrics(exp.id, 1, "EPOCH", ["val_top1"], [(100 * (e + 1), e, 0.0, [0.5]) for e in (0, 1, 3)])
    assert store.delivered(exp.id) == (200, 2)
    # A row exists when any metric is stored at that step: two series, each with gaps,
    # that together cover step 200 (loss at even steps, lr at odd ones past 300).
    store.add_metrics(exp.id, 1, "STEP", ["acc"], [(200, 2, 0.0, [0.3])])
    assert store.delivered(exp.id)[0] == 250
    store.add_metrics(exp.id, 1, "STEP", ["loss"], [(s, 3, 0.0, [1.0]) for s in range(250, 400, 2)])
    store.add_metrics(exp.id, 1, "STEP", ["lr"], [(s, 3, 0.0, [1.0]) for s in range(301, 400, 2)])
    assert store.delivered(exp.id) == (400, 2)
    store.add_metrics(exp.id, 1, "EPOCH", ["val_top1", "x"], [(300, 2, 0.0, [0.5, NAN])])
    assert store.delivered(exp.id) == (400, 4)
    with pytest.raises(NotFound):
        store.delivered(999)


def test_store_id_is_made_once(store_url):
    with open_store(store_url) as s:
        first = s.store_id()
    assert len(first) == 32 and int(first, 16) >= 0
    with open_store(store_url) as s:
        assert s.store_id() == first


def test_upgrade_from_0002_keeps_commands_and_makes_a_store_id(store_url):
    from alembic import command
    from sqlalchemy import create_engine

    from trainctl.server.store.migrate import alembic_config

    command.upgrade(alembic_config(store_url), "0002")  # a database of the previous release
    engine = create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO experiments (id, name, state, spec, created_at, attempt, message, summary, last_step, "
            "max_restarts, restarts, gpus) VALUES (1, 'old', 'RUNNING', '{}', 0, 1, '', '{}', 0, 3, 0, 0), "
            "(2, 'old2', 'QUEUED', '{}', 0, 0, '', '{}', 0, 3, 0, 0)"))
        conn.execute(text("INSERT INTO controls (command_id, experiment_id, kind, value, status, source, "
                          "requested_at, message) VALUES ('c1', 1, 'SET_LR', 0.5, 'PENDING', 'LIVE', 1.0, '')"))
    engine.dispose()
    with open_store(store_url) as s:
        assert len(s.store_id()) == 32
        (c1,) = s.list_controls(1)
        assert (c1.command_id, c1.kind, c1.value, c1.hold, c1.consequence) == ("c1", "SET_LR", 0.5, False, "")
        assert s.add_control(ControlRecord("c1", 2, "SET_LR", 0.1)).experiment_id == 2  # scoped now


def test_a_locked_database_is_store_unavailable(db_path, monkeypatch):
    """A write lock held by another process (BEGIN EXCLUSIVE) past the busy timeout is
    StoreUnavailable naming the method, with no driver text; reads go on (WAL); the
    same call succeeds once the lock is gone."""
    from trainctl.server.store import dialects
    from trainctl.server.store.errors import StoreUnavailable

    monkeypatch.setattr(dialects, "SQLITE_BUSY_TIMEOUT_MS", 100)
    store = open_store(f"sqlite:///{db_path}")
    exp = running(store)
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable) as err:
            store.requeue(exp.id, 1, "lease expired")
        assert str(err.value) == "the database is unavailable (requeue: database is locked); try again"
        with pytest.raises(StoreUnavailable, match=r"\(add_metrics: database is locked\)"):
            store.add_metrics(exp.id, 1, "STEP", ["loss"], [(0, 0, 0.0, [1.0])])
        assert store.get_experiment(exp.id).state == "RUNNING"  # nothing changed; reads work
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.requeue(exp.id, 1, "lease expired").state == "QUEUED"
    store.close()
