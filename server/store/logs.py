"""Captured output of runs in the store (a mixin of SqlAlchemyStore, like KnobsMixin).

Lines come from the worker that holds the run (fenced by experiment and attempt like
its metrics), numbered per attempt from 1. A line already stored is ignored, so the
worker may resend whatever it has not seen acknowledged after a reconnect.

Bounded per experiment: past `max_lines` the oldest lines (by attempt, then index) are
deleted in the same transaction and counted in `log_state.dropped`, which `Logs` shows
as a SYSTEM marker ("N earlier lines dropped"). The newest dropped key is remembered as
a floor: a late resend of a dropped line is not stored again (it would be the oldest
line, dropped at once, and counted twice).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import and_, delete, func, or_, select

from trainctl.logtext import MAX_TEXT_BYTES, cut_text  # noqa: F401 (MAX_TEXT_BYTES: the bound, named here too)

from . import dialects
from .entities import LogLine
from .errors import NotFound
from .tables import ExperimentModel, LogStateModel, log_lines

MAX_LINES = 100_000        # lines kept per experiment (every attempt together)
LOG_STREAMS = (1, 2, 3, 4)  # STDOUT, STDERR, LOGGING, SYSTEM (proto LogStream)
PAGE_LINES = 256  # lines per read (and per follower held at once: <= 4 MiB at 16 KiB a line)


def clean_line(line: LogLine) -> LogLine | None:
    """What the store keeps of a line a worker sent: None for an index below 1, the text
    cut to MAX_TEXT_BYTES, an unknown stream read as STDOUT (proto3 enums are open)."""
    if line.index < 1:
        return None
    text = cut_text(line.text)
    stream = line.stream if line.stream in LOG_STREAMS else 1
    if text is line.text and stream == line.stream:
        return line
    return LogLine(line.attempt, line.index, stream, line.wall_time, text)


_COLUMNS = ("experiment_id", "attempt", "idx", "stream", "wall_time", "text")
_SQL: dict[str, tuple[str, bool]] = {}


def _insert_sql(dialect_name: str, dialect) -> tuple[str, bool]:
    """The insert-or-ignore of log_lines compiled once per dialect: (sql, positional)."""
    if dialect_name not in _SQL:
        compiled = dialects.insert(dialect_name, log_lines).on_conflict_do_nothing() \
            .values({c: None for c in _COLUMNS}).compile(dialect=dialect)
        if compiled.positional and tuple(compiled.positiontup) != _COLUMNS:
            raise RuntimeError(f"log_lines insert binds {compiled.positiontup}, expected {_COLUMNS}")
        _SQL[dialect_name] = (str(compiled), compiled.positional)
    return _SQL[dialect_name]


def _line(row) -> LogLine:
    return LogLine(attempt=row.attempt, index=row.idx, stream=row.stream, wall_time=row.wall_time, text=row.text)


class LogsMixin:
    def add_logs(self, experiment_id: int, attempt: int, lines: Sequence[LogLine], *,
                 max_lines: int | None = None) -> list[LogLine]:
        """Store the lines of `attempt` (their own `attempt` is ignored) that are new;
        returns those, in index order. Fenced like add_metrics (StaleAttempt, NotFound).
        Past `max_lines` (default MAX_LINES) stored lines the experiment's oldest are dropped."""
        max_lines = max_lines or MAX_LINES
        clean: dict[int, LogLine] = {}
        for line in lines:
            c = clean_line(line)
            if c is not None:
                clean.setdefault(c.index, c)
        with self._session(write=True) as s:
            current = s.execute(select(ExperimentModel.attempt, ExperimentModel.worker_id)
                                .where(ExperimentModel.id == experiment_id).with_for_update()).first()
            if current is None:
                raise NotFound("experiment", experiment_id)
            self._check_live(experiment_id, attempt, *current)
            if not clean:
                return []
            st = s.get(LogStateModel, experiment_id)
            if st is None:
                st = LogStateModel(experiment_id=experiment_id, stored=0, dropped=0, floor_attempt=0, floor_idx=0)
                s.add(st)
            floor = (st.floor_attempt, st.floor_idx)
            idxs = sorted(i for i in clean if (attempt, i) > floor)
            if not idxs:
                return []
            c = log_lines.c
            have = set(s.scalars(select(c.idx).where(c.experiment_id == experiment_id, c.attempt == attempt,
                                                     c.idx.between(idxs[0], idxs[-1]))))
            new = [clean[i] for i in idxs if i not in have]
            if not new:
                return []
            # ON CONFLICT DO NOTHING: belt and braces (the experiment row's lock already
            # serialises writers of this experiment on PostgreSQL; SQLite has one writer).
            # Straight to the driver's executemany, as add_metrics does: binding each row
            # through SQLAlchemy cost more than SQLite's own work.
            sql, positional = _insert_sql(self._dialect, self._engine.dialect)
            rows = [(experiment_id, attempt, ln.index, ln.stream, ln.wall_time, ln.text) for ln in new]
            s.connection().exec_driver_sql(sql, rows if positional else [dict(zip(_COLUMNS, r)) for r in rows])
            st.stored += len(new)
            excess = st.stored - max_lines
            if excess > 0:
                last = s.execute(select(c.attempt, c.idx).where(c.experiment_id == experiment_id)
                                 .order_by(c.attempt, c.idx).offset(excess - 1).limit(1)).first()
                fa, fi = last
                s.execute(delete(log_lines).where(c.experiment_id == experiment_id,
                                                  or_(c.attempt < fa, and_(c.attempt == fa, c.idx <= fi))))
                st.stored -= excess
                st.dropped += excess
                st.floor_attempt, st.floor_idx = fa, fi
                new = [ln for ln in new if (attempt, ln.index) > (fa, fi)]
            return [LogLine(attempt, ln.index, ln.stream, ln.wall_time, ln.text) for ln in new]

    def read_logs(self, experiment_id: int, *, attempt: int = 0, after: tuple[int, int] = (0, 0),
                  limit: int = PAGE_LINES) -> list[LogLine]:
        """Up to `limit` stored lines after key `after` = (attempt, index), in key order;
        only `attempt`'s when it is not 0."""
        c = log_lines.c
        fa, fi = after
        stmt = (select(c.attempt, c.idx, c.stream, c.wall_time, c.text)
                .where(c.experiment_id == experiment_id, or_(c.attempt > fa, and_(c.attempt == fa, c.idx > fi)))
                .order_by(c.attempt, c.idx).limit(limit))
        if attempt:
            stmt = stmt.where(c.attempt == attempt)
        with self._session() as s:
            return [_line(r) for r in s.execute(stmt)]

    def log_tail_key(self, experiment_id: int, tail: int, *, attempt: int = 0) -> tuple[int, int]:
        """The key to read after (`read_logs(after=...)`) for the last `tail` lines."""
        c = log_lines.c
        stmt = (select(c.attempt, c.idx).where(c.experiment_id == experiment_id)
                .order_by(c.attempt.desc(), c.idx.desc()).offset(tail).limit(1))
        if attempt:
            stmt = stmt.where(c.attempt == attempt)
        with self._session() as s:
            row = s.execute(stmt).first()
        return (row.attempt, row.idx) if row is not None else (0, 0)

    def log_state(self, experiment_id: int) -> dict:
        """{"stored", "dropped", "floor": (attempt, index)} of the experiment's lines
        (NotFound for no such experiment)."""
        with self._session() as s:
            self._experiment_row(s, experiment_id)
            st = s.get(LogStateModel, experiment_id)
            if st is None:
                return {"stored": 0, "dropped": 0, "floor": (0, 0)}
            return {"stored": st.stored, "dropped": st.dropped, "floor": (st.floor_attempt, st.floor_idx)}

    def count_logs(self, experiment_id: int) -> int:
        with self._session() as s:
            return s.execute(select(func.count()).select_from(log_lines)
                             .where(log_lines.c.experiment_id == experiment_id)).scalar_one()
