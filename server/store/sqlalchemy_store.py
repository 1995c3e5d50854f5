"""`AbstractStore` on SQLAlchemy: SQLite by default, PostgreSQL for bigger installs.

Concurrency model
-----------------
The gRPC server calls the store from many threads. On SQLite there is one writer at a
time anyway, so writes are serialised in-process by a first-come lock (writelock.py;
no thread ever waits on SQLITE_BUSY, and a long metrics write commits in parts while a
short write waits; on any database it also steps aside between parts while a client
waits on a command: `urgent`) and every write transaction starts with `BEGIN
IMMEDIATE`, which takes the database's write lock up front: a transaction that reads
then writes (claim_next) can never have its snapshot overtaken by another process's
write, and busy_timeout queues writers from other processes. WAL mode lets readers run
next to that writer, each in a plain deferred `BEGIN` (a consistent snapshot).

On PostgreSQL the lock is not used (several servers may share the database): row locks
do the work. claim_next takes its candidate `FOR UPDATE SKIP LOCKED`, so concurrent
claimers pass each other instead of queueing; every other read-then-write (transition,
requeue, cancel, the fencing check of add_metrics, resolve_control) reads its row
`FOR UPDATE`, so it cannot act on a state another transaction is changing (READ
COMMITTED alone would let a requeue and a worker's COMPLETED both succeed). Inserts that
may race (metrics, workers) are upserts; add_control catches the duplicate key. SQLite
renders no FOR UPDATE: BEGIN IMMEDIATE has already serialised the transaction.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from sqlalchemy import func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from . import dialects
from . import entities as E
from .base import AbstractStore
from .artifacts import ArtifactsMixin
from .controls import ControlsMixin, expire_pending
from .knobs import KnobsMixin
from .logs import LogsMixin
from .metrics import MetricsMixin
from .convert import experiment as _experiment
from .convert import worker as _worker
from .entities import Experiment, Worker
from .errors import InvalidTransition, NotFound, StaleAttempt, StoreUnavailable
from .migrate import upgrade_to_head
from .tables import ExperimentModel, ExperimentTagModel, MetaModel, WorkerModel
from .tags import MAX_TAGS, check_note, check_tags
from .writelock import FairLock, NoLock, Urgency

# Legal worker-driven moves; requeue and cancel have their own rules.
_TRANSITIONS = {
    E.ASSIGNED: frozenset({E.RUNNING, E.COMPLETED, E.FAILED, E.CANCELLED}),
    E.RUNNING: frozenset({E.COMPLETED, E.FAILED, E.CANCELLED}),
}


class SqlAlchemyStore(ControlsMixin, KnobsMixin, ArtifactsMixin, LogsMixin, MetricsMixin, AbstractStore):
    def __init__(self, url: str):
        parsed = dialects.normalize_url(url)  # postgresql:// means psycopg 3
        self.url = parsed.render_as_string(hide_password=False)
        self._dialect = parsed.get_backend_name()
        in_memory = dialects.is_sqlite_memory(parsed)
        self._engine = dialects.make_engine(parsed)
        # Same pool, but a transaction begun through it is a write (BEGIN IMMEDIATE).
        self._write_engine = self._engine.execution_options(trainctl_write=True)

        if self._dialect == "sqlite":
            self._write_lock = FairLock()
            # One shared in-memory connection must not be used by two threads at once.
            self._read_lock = self._write_lock if in_memory else contextlib.nullcontext()
        else:
            self._write_lock = self._read_lock = NoLock()

        self._urgency = Urgency()  # metric writes step aside while a client waits on a command
        self._init_metrics()  # the compiled metrics upsert and the rollup (metrics.py)
        # Driver errors that mean "the database cannot be reached or written now" (locked,
        # disk full, connection lost); raw-cursor reads (series.py) raise them unwrapped.
        dbapi = self._engine.dialect.dbapi
        self._outage_errors = tuple(getattr(dbapi, n) for n in ("OperationalError", "InterfaceError")
                                    if hasattr(dbapi, n))
        self._store_id: str | None = None
        try:
            self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    # ---------------------------------------------------------------- plumbing

    @contextlib.contextmanager
    def _session(self, *, write: bool = False, bulk: bool = False) -> Iterator[Session]:
        """The one way in: a session in a transaction, committed on success, else rolled back.

        Also the one place where an outage (locked or full database, lost connection)
        becomes StoreUnavailable, naming the store method: nothing outside the store
        sees SQLAlchemy or driver text. Nothing was committed when it is raised.
        `bulk`: a long write (a metric batch) that short writes may go between.
        """
        operation = sys._getframe(2).f_code.co_name  # the store method using this session
        engine = self._write_engine if write else self._engine
        try:
            with (
                (self._write_lock.bulk() if bulk else self._write_lock) if write else self._read_lock,
                Session(engine, expire_on_commit=False) as session,
                session.begin(),
            ):
                yield session
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, *self._outage_errors) as exc:
            raise StoreUnavailable(operation, exc) from exc
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise StoreUnavailable(operation, exc) from exc
            raise

    def urgent(self):
        return self._urgency.hold()

    def _migrate(self) -> None:
        with self._write_lock, self._write_engine.begin() as conn:
            upgrade_to_head(conn, self.url)

    def close(self) -> None:
        self._engine.dispose()

    @staticmethod
    def _experiment_row(s: Session, id: int, *, lock: bool = False) -> ExperimentModel:
        """The row; `lock` (for read-then-write) takes it FOR UPDATE on PostgreSQL."""
        row = s.get(ExperimentModel, id, with_for_update=lock)
        if row is None:
            raise NotFound("experiment", id)
        return row

    @staticmethod
    def _check_live(id: int, attempt: int, current_attempt: int, worker_id: str | None) -> None:
        """Fencing: only the experiment's current, still-assigned run may act on it."""
        if attempt != current_attempt:
            raise StaleAttempt(id, attempt, current_attempt)
        # requeue keeps the attempt number (the next claim bumps it) but drops the
        # worker, so "same attempt, no worker" is a run whose lease was revoked.
        if worker_id is None:
            raise StaleAttempt(id, attempt, current_attempt, revoked=True)

    # ---------------------------------------------------------------- experiments

    def create_experiment(self, name, spec, *, max_restarts=3, gpus=0, replay_of=None, kind=E.SPEC,
                          tags=()) -> Experiment:
        tags = check_tags("tags", tags)
        if kind not in (E.SPEC, E.CODE):  # attached runs are made by create_attached
            raise ValueError(f"kind: SPEC or CODE, got {kind!r}")
        with self._session(write=True) as s:
            if replay_of is not None:
                self._experiment_row(s, replay_of)
            row = ExperimentModel(
                name=name,
                state=E.QUEUED,
                spec=spec,
                created_at=time.time(),
                attempt=0,
                message="",
                summary={},
                last_step=0,
                max_restarts=max_restarts,
                restarts=0,
                gpus=gpus,
                replay_of=replay_of,
                kind=kind,
            )
            s.add(row)
            s.flush()  # assigns the id
            if tags:
                row.tag_rows = [ExperimentTagModel(experiment_id=row.id, tag=t) for t in sorted(set(tags))]
                s.flush()
            return _experiment(row)

    def get_experiment(self, id) -> Experiment:
        with self._session() as s:
            return _experiment(self._experiment_row(s, id))

    def list_experiments(self, states=None, limit=100, *, tags=None, before_id=None) -> list[Experiment]:
        stmt = select(ExperimentModel).order_by(ExperimentModel.id.desc()).limit(limit if limit > 0 else 100)
        if states:
            stmt = stmt.where(ExperimentModel.state.in_(list(states)))
        if before_id is not None:  # keyset paging: the page after the one that ended at before_id
            stmt = stmt.where(ExperimentModel.id < before_id)
        stmt = _with_tags(stmt, tags)
        with self._session() as s:
            return [_experiment(row) for row in s.scalars(stmt)]

    def claim_next(self, worker_id, free_gpus, *, accepts_code=True) -> Experiment | None:
        # An attached loop runs where it is; code only on workers that run code.
        refused = [E.ATTACHED] if accepts_code else [E.ATTACHED, E.CODE]
        stmt = (
            select(ExperimentModel)
            .where(ExperimentModel.state == E.QUEUED, ExperimentModel.gpus <= free_gpus,
                   ExperimentModel.kind.not_in(refused))
            .order_by(ExperimentModel.id)
            .limit(1)
            # PostgreSQL: concurrent claimers skip each other's candidate instead of
            # queueing on it. SQLite renders nothing here; BEGIN IMMEDIATE covers it.
            .with_for_update(skip_locked=True)
        )
        with self._session(write=True) as s:
            row = s.scalars(stmt).first()
            if row is None:
                return None
            row.state = E.ASSIGNED
            row.attempt += 1
            row.worker_id = worker_id
            return _experiment(row)

    def transition(self, id, attempt, state, *, message="", summary=None) -> Experiment:
        with self._session(write=True) as s:
            row = self._experiment_row(s, id, lock=True)
            self._check_live(id, attempt, row.attempt, row.worker_id)
            if state == row.state:
                # A worker resending its last StateUpdate (after a reconnect) is harmless.
                return _experiment(row)
            if state not in _TRANSITIONS.get(row.state, ()):
                raise InvalidTransition(id, row.state, state)
            now = time.time()
            row.state = state
            row.message = message
            if state == E.RUNNING and row.started_at is None:
                # started_at is when the experiment first ran; a resumed attempt keeps it.
                row.started_at = now
            if state in E.FINAL_STATES:
                row.finished_at = now
            if summary is not None:
                row.summary = {k: float(v) for k, v in summary.items()}
            if state in E.FINAL_STATES:
                expire_pending(s, row)
            return _experiment(row)

    def requeue(self, id, attempt, reason, *, count_restart=True) -> Experiment:
        with self._session(write=True) as s:
            row = self._experiment_row(s, id, lock=True)
            self._check_live(id, attempt, row.attempt, row.worker_id)
            if row.state not in E.ACTIVE_STATES:
                raise InvalidTransition(id, row.state, E.QUEUED)
            row.worker_id = None  # fences this attempt from now on
            if row.kind == E.ATTACHED:
                # The user's own process: no worker can run it instead, so it ends here.
                row.state = E.FAILED
                row.finished_at = time.time()
                row.message = reason
                expire_pending(s, row)
            elif not count_restart:
                row.state = E.QUEUED
                row.message = reason
            elif row.restarts < row.max_restarts:
                row.state = E.QUEUED
                row.restarts += 1
                row.message = reason
            else:
                row.state = E.FAILED
                row.finished_at = time.time()
                row.message = f"{reason}; gave up after {row.max_restarts} restarts"
                expire_pending(s, row)
            return _experiment(row)

    def cancel(self, id, reason) -> Experiment:
        with self._session(write=True) as s:
            row = self._experiment_row(s, id, lock=True)
            if row.state in E.FINAL_STATES:
                raise InvalidTransition(id, row.state, E.CANCELLED)
            row.state = E.CANCELLED
            row.finished_at = time.time()
            row.message = reason
            expire_pending(s, row)
            return _experiment(row)

    def annotate(self, id, *, add_tags=(), remove_tags=(), note=None) -> Experiment:
        add = check_tags("add_tags", add_tags)
        remove = set(check_tags("remove_tags", remove_tags))
        if note is not None:
            check_note(note)
        with self._session(write=True) as s:
            row = self._experiment_row(s, id, lock=True)
            have = {t.tag for t in row.tag_rows}
            keep = [t for t in row.tag_rows if t.tag not in remove]
            new = [t for t in add if t not in have and t not in remove]
            if len(keep) + len(new) > MAX_TAGS:
                raise ValueError(f"add_tags: experiment {id} would carry {len(keep) + len(new)} tags; "
                                 f"at most {MAX_TAGS}")
            row.tag_rows = keep + [ExperimentTagModel(experiment_id=id, tag=t) for t in new]
            if note is not None:
                row.note = note
            s.flush()
            row.tag_rows.sort(key=lambda t: t.tag)
            return _experiment(row)

    # ---------------------------------------------------------------- lineage and counts

    def store_id(self) -> str:
        if self._store_id is None:  # made once by migration 0003; never changes after
            with self._session() as s:
                row = s.get(MetaModel, "store_id")
                if row is None:
                    raise NotFound("meta key", "store_id")
                self._store_id = row.value
        return self._store_id

    def count_by_state(self) -> dict[str, int]:
        stmt = select(ExperimentModel.state, func.count()).group_by(ExperimentModel.state)
        with self._session() as s:
            return {state: n for state, n in s.execute(stmt)}

    # ---------------------------------------------------------------- workers

    def upsert_worker(self, id, hostname, devices) -> Worker:
        values = dict(hostname=hostname, devices=list(devices), connected=True, last_seen=time.time())
        stmt = dialects.insert(self._dialect, WorkerModel.__table__).values(id=id, **values)
        # One statement, so two servers registering the same worker at once cannot collide.
        stmt = stmt.on_conflict_do_update(index_elements=[WorkerModel.id], set_=values)
        with self._session(write=True) as s:
            s.execute(stmt)
            return _worker(s.get(WorkerModel, id, populate_existing=True))

    def mark_worker(self, id, connected) -> Worker:
        with self._session(write=True) as s:
            row = s.get(WorkerModel, id)
            if row is None:
                raise NotFound("worker", id)
            row.connected = connected
            row.last_seen = time.time()
            return _worker(row)

    def list_workers(self) -> list[Worker]:
        with self._session() as s:
            return [_worker(row) for row in s.scalars(select(WorkerModel).order_by(WorkerModel.id))]


# -------------------------------------------------------------------- helpers


def _with_tags(stmt, tags):
    """Only experiments carrying every one of `tags` (an index lookup per tag)."""
    for tag in check_tags("tags", tags or ()):
        stmt = stmt.where(ExperimentModel.id.in_(
            select(ExperimentTagModel.experiment_id).where(ExperimentTagModel.tag == tag)))
    return stmt
