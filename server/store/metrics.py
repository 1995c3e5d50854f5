"""Metrics in the store (a mixin of SqlAlchemyStore, like LogsMixin): the fenced
batch write, series reads (full or min/max downsampled from the rollup, series.py),
wall times, rows for Watch history, and the delivered counts (lineage.py).

A batch comes from the worker that holds the run: add_metrics checks experiment and
attempt (`_check_live`) on the experiment row, read FOR UPDATE on PostgreSQL, in the
same transaction as the upsert of its rows, so a requeued attempt's late rows are
refused (the store's concurrency model: sqlalchemy_store.py). A large batch commits in
parts while another write waits (SQLite) or a client waits on a command (`urgent`, any
database: the batch steps aside between parts), each part checked so; a part refused
leaves the parts before it stored, as if the sender had cut the batch there.
The write is an upsert on (experiment, name, scope, step) that only a same or later
attempt wins (dialects.metrics_upsert): a resent batch is harmless.

It uses the store's `_session`, `_experiment_row`, `_check_live`, `_engine`,
`_dialect`, `_write_lock` and `_urgency`; the store's __init__ calls `_init_metrics`.
"""

from __future__ import annotations

import operator

from sqlalchemy import func, select, update

from . import dialects
from . import entities as E
from .entities import MetricRow, MetricSeries
from .errors import NotFound
from .lineage import delivered as _delivered
from .series import Rollup
from .tables import ExperimentModel, metrics

# On SQLite, one upsert statement carries this many rows (VALUES (...), (...), ...):
# 960 parameters, under the 999 of old SQLite builds. executemany ran SQLite once per row
# and let go of the GIL each time: 4,000 hand-overs a second of rows, which slowed every
# other server thread (a set-lr's store calls took 2-10x longer meanwhile); this way the
# upserts also take a third less time (a whole batch write a sixth to a quarter less).
ROWS_PER_STATEMENT = 120

# A batch with more points than this is written in parts of this size, and commits
# between parts when another write waits for the lock: a second of an attached run's
# rows (~4,000 points, ~16 ms on SQLite) held a set-lr behind it for that long. Two
# upsert statements (~1 ms): set-lr waits that long at most for each of its two writes.
WRITE_PART = 2 * ROWS_PER_STATEMENT

# Parameter order of the metrics upsert (the table's column order).
_METRIC_COLUMNS = ("experiment_id", "scope", "step", "epoch", "name", "value", "wall_time", "attempt")
_STEP = operator.itemgetter(2)
_ONE_ROW = "(" + ", ".join(["?"] * len(_METRIC_COLUMNS)) + ")"


class MetricsMixin:
    def _init_metrics(self) -> None:
        # The metrics upsert is a Core statement compiled once; add_metrics hands its SQL
        # and plain tuples straight to the driver's executemany. Letting SQLAlchemy bind
        # each row's parameters instead costs more than SQLite's own work: ~105k vs
        # ~250k points/s on a 2-core box.
        compiled = dialects.metrics_upsert(self._dialect).compile(dialect=self._engine.dialect)
        self._upsert_sql = str(compiled)
        self._upsert_positional = compiled.positional  # sqlite: qmark; psycopg: named
        if compiled.positional and list(compiled.positiontup) != list(_METRIC_COLUMNS):
            raise RuntimeError(f"metrics upsert binds {compiled.positiontup}, expected {_METRIC_COLUMNS}")
        if compiled.positional and self._upsert_sql.count(_ONE_ROW) != 1:
            raise RuntimeError(f"metrics upsert has no one VALUES {_ONE_ROW}: {self._upsert_sql}")
        self._upsert_n: dict[int, str] = {}  # SQLite: the upsert of n rows, by n
        # The min/max rollup behind downsampled reads, kept exact by add_metrics (series.py).
        self._rollup = Rollup(self._dialect, self._engine.dialect)

    def _upsert_points(self, conn, part: list[tuple]) -> None:
        if not self._upsert_positional:  # PostgreSQL: psycopg's executemany pipelines the rows
            conn.exec_driver_sql(self._upsert_sql, [dict(zip(_METRIC_COLUMNS, p)) for p in part])
            return
        cur = conn.connection.cursor()  # the driver's cursor: no SQLAlchemy work per statement
        try:
            for i in range(0, len(part), ROWS_PER_STATEMENT):
                rows = part[i:i + ROWS_PER_STATEMENT]
                sql = self._upsert_n.get(len(rows))
                if sql is None:
                    sql = self._upsert_n[len(rows)] = self._upsert_sql.replace(_ONE_ROW, ", ".join([_ONE_ROW] * len(rows)))
                cur.execute(sql, [v for row in rows for v in row])
        finally:
            cur.close()

    def add_metrics(self, experiment_id, attempt, scope, names, rows) -> int:
        if scope not in E.SCOPES:
            raise ValueError(f"scope must be one of {E.SCOPES}, got {scope!r}")
        names = list(names)
        self._urgency.step_aside()
        # Built before taking the write lock: this loop is most of the call's CPU time.
        params = []
        for step, epoch, wall_time, values in rows:
            if len(values) != len(names):
                raise ValueError(f"step {step}: {len(values)} values for {len(names)} names")
            for name, value in zip(names, values):
                if value != value:  # NaN marks "not logged at this step"
                    continue
                # In _METRIC_COLUMNS order.
                params.append((experiment_id, scope, step, epoch, name, value, wall_time, attempt))

        done = 0
        while True:  # one transaction, or several when a short write or a command waits
            if done:
                self._urgency.step_aside()  # between transactions: holding no lock
            with self._session(write=True, bulk=True) as s:
                current = s.execute(
                    select(ExperimentModel.attempt, ExperimentModel.worker_id)
                    .where(ExperimentModel.id == experiment_id)
                    # PostgreSQL: a requeue cannot fence this attempt between check and write.
                    .with_for_update()
                ).first()
                if current is None:
                    raise NotFound("experiment", experiment_id)
                self._check_live(experiment_id, attempt, *current)
                if not params:
                    return 0
                conn = s.connection()
                start = done
                while done < len(params):
                    part = params[done:done + WRITE_PART]
                    done += len(part)
                    self._upsert_points(conn, part)
                    if done < len(params) and (self._write_lock.waiting() or self._urgency.active()):
                        break  # commit this much; the waiting write or command goes next (writelock.py)
                written = params[start:done]
                self._rollup.update(conn, experiment_id, scope, written)  # same transaction
                top = max(map(_STEP, written))
                conn.execute(
                    update(ExperimentModel.__table__)
                    .where(ExperimentModel.id == experiment_id, ExperimentModel.last_step < top)
                    .values(last_step=top)
                )
            if done == len(params):
                return len(params)

    def get_metrics(self, id, *, scope=None, names=None, from_step=0, to_step=None) -> list[MetricSeries]:
        with self._session() as s:
            self._experiment_row(s, id)
            return self._rollup.series(s.connection(), id, scope, names, from_step, to_step)

    def get_metrics_downsampled(self, id, max_points, *, scope=None, names=None, from_step=0, to_step=None):
        if max_points <= 0:
            return super().get_metrics_downsampled(id, max_points, scope=scope, names=names, from_step=from_step,
                                                   to_step=to_step)
        with self._session() as s:
            self._experiment_row(s, id)
            return self._rollup.downsampled(s.connection(), id, scope, names, from_step, to_step, max_points)

    def wall_times(self, id, steps) -> dict[int, float]:
        m = metrics.c
        steps = sorted({int(st) for st in steps})[:5000]
        if not steps:
            return {}
        # One probe of the (experiment_id, step) index per step: a few ms for 1,000 steps
        # of a 1,000,000-point run, where scanning a series would read it all.
        stmt = (select(m.step, func.min(m.wall_time)).where(m.experiment_id == id, m.scope == E.STEP,
                                                            m.step.in_(steps)).group_by(m.step))
        with self._session() as s:
            return {step: wall for step, wall in s.connection().execute(stmt)}

    def count_metrics(self, id) -> int:
        with self._session() as s:
            self._experiment_row(s, id)
            return s.execute(select(func.count()).select_from(metrics).where(metrics.c.experiment_id == id)).scalar_one()

    def metric_rows(self, id, *, scope=None, from_step=0, to_step=None) -> list[MetricRow]:
        m = metrics.c
        stmt = (
            select(m.scope, m.step, m.epoch, m.wall_time, m.name, m.value)
            .where(*self._metric_filter(id, scope, from_step, to_step))
            # Only by step, which the (experiment_id, step) index yields without a sort
            # (ordering by scope too costs SQLite a temp B-tree, ~40% more at 1M points);
            # the scopes of one step are put in order below.
            .order_by(m.step)
        )
        out: list[MetricRow] = []
        at_step: dict[str, MetricRow] = {}  # the rows of the step being read, by scope
        current = None
        with self._session() as s:
            self._experiment_row(s, id)
            for sc, step, epoch, wall_time, name, value in s.connection().execute(stmt):
                if step != current:
                    out.extend(_step_before_epoch(at_step))
                    at_step = {}
                    current = step
                row = at_step.get(sc)
                if row is None:
                    row = at_step[sc] = MetricRow(scope=sc, step=step, epoch=epoch, wall_time=wall_time, values={})
                row.values[name] = value
        out.extend(_step_before_epoch(at_step))
        return out

    @staticmethod
    def _metric_filter(id, scope, from_step, to_step) -> list:
        m = metrics.c
        where = [m.experiment_id == id]
        if scope:
            where.append(m.scope == scope)
        if from_step:
            # Only when it filters something (0 means from the start).
            where.append(m.step >= from_step)
        if to_step is not None:
            where.append(m.step <= to_step)  # inclusive
        return where

    def delivered(self, experiment_id) -> tuple[int, int]:
        ph = "?" if self._dialect == "sqlite" else "%s"
        with self._session() as s:
            self._experiment_row(s, experiment_id)
            cur = s.connection().connection.cursor()  # driver cursor: no per-row objects
            try:
                return _delivered(cur, ph, experiment_id)
            finally:
                cur.close()


def _step_before_epoch(rows_by_scope: dict[str, MetricRow]) -> list[MetricRow]:
    # The step row comes before the epoch row that ends at the same step: the order a
    # live stream produces them in, so Watch history and live events look alike.
    return [rows_by_scope[scope] for scope in E.SCOPES if scope in rows_by_scope]
