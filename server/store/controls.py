"""Control commands in the store: add (idempotent per experiment), resolve, list, expire.

A command id names one command of one experiment: the key is (experiment_id,
command_id). A retry repeating kind, value and hold gets the stored record back; the
same id with other content is AlreadyExists. Every command ends APPLIED, REJECTED or
EXPIRED: when its experiment reaches a final state, `expire_pending` (called inside
the transaction that made it final) ends what is still PENDING, with the reason.

A mixin of SqlAlchemyStore: it uses the store's `_session` and `_experiment_row`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import entities as E
from .convert import control as _control
from .entities import ControlRecord
from .errors import AlreadyExists, NotFound
from .tables import ControlModel, ExperimentModel


_CONTROLS = ControlModel.__table__
_EXPERIMENTS = ExperimentModel.__table__


class ControlsMixin:
    # add_control and resolve_control are on set-lr's path (a client waits for both), so
    # they are Core statements, one round trip each where the ORM took two or three.

    def add_control(self, record: ControlRecord) -> ControlRecord:
        _check_one_of("kind", record.kind, E.CONTROL_KINDS)
        _check_one_of("status", record.status, E.CONTROL_STATUSES)
        _check_one_of("source", record.source, E.CONTROL_SOURCES)
        c, x = _CONTROLS, _EXPERIMENTS
        key = (c.c.experiment_id == record.experiment_id) & (c.c.command_id == record.command_id)
        try:
            with self._session(write=True) as s:
                conn = s.connection()
                # The experiment and an earlier command with this id, in one read.
                found = conn.execute(
                    select(x.c.state, x.c.last_step, c.c.command_id.label("existing"), *c.c)
                    .select_from(x.outerjoin(c, key & (c.c.experiment_id == x.c.id)))
                    .where(x.c.id == record.experiment_id)
                ).first()
                if found is None:
                    raise NotFound("experiment", record.experiment_id)
                if found.existing is not None:
                    return _same_or_conflict(found, record)
                values = dict(
                    command_id=record.command_id, experiment_id=record.experiment_id, kind=record.kind,
                    value=record.value, status=record.status, source=record.source,
                    requested_at=record.requested_at or time.time(), applied_at=record.applied_at,
                    applied_step=record.applied_step, old_value=record.old_value, new_value=record.new_value,
                    message=record.message, at_step=record.at_step, consequence=record.consequence,
                    hold=record.hold, knob=record.knob,
                )
                if record.status == E.PENDING and found.state in E.FINAL_STATES:
                    # Raced with the run's end (the caller checked before): it can never
                    # apply, so it is stored ended rather than PENDING forever.
                    values.update(status=E.EXPIRED, applied_at=time.time(),
                                  message=_expiry(found.state, found.last_step, record.at_step))
                conn.execute(insert(c).values(**values))
                return ControlRecord(**values)
        except IntegrityError:
            # PostgreSQL only (SQLite writes are serialised): a concurrent retry with the
            # same key committed first; answer as if it had come first.
            with self._session() as s:
                existing = s.connection().execute(select(c).where(key)).first()
                if existing is None:
                    raise
                return _same_or_conflict(existing, record)

    def resolve_control(
        self,
        experiment_id: int,
        command_id: str,
        *,
        status: str,
        applied_step: int | None = None,
        old_value: float | None = None,
        new_value: float | None = None,
        message: str = "",
        applied_at: float | None = None,
        consequence: str = "",
    ) -> ControlRecord:
        _check_one_of("status", status, (E.APPLIED, E.REJECTED))
        c = _CONTROLS
        key = (c.c.experiment_id == experiment_id) & (c.c.command_id == command_id)
        with self._session(write=True) as s:
            conn = s.connection()
            # Only a PENDING command changes: of two concurrent acks (PostgreSQL), the
            # second's UPDATE waits for the first's row lock, then matches nothing.
            row = conn.execute(
                update(c).where(key, c.c.status == E.PENDING)
                .values(status=status, applied_step=applied_step, old_value=old_value, new_value=new_value,
                        message=message, consequence=consequence,
                        applied_at=applied_at if applied_at is not None else time.time())
                .returning(*c.c)
            ).first()
            if row is None:  # already resolved (a resent ack), or no such command
                row = conn.execute(select(c).where(key)).first()
                if row is None:
                    raise NotFound("control command", f"{command_id} of experiment {experiment_id}")
            return _control(row)

    def list_controls(self, experiment_id: int, *, status: str | None = None) -> list[ControlRecord]:
        c = ControlModel
        stmt = (
            select(c)
            .where(c.experiment_id == experiment_id)
            .order_by(func.coalesce(c.applied_step, c.at_step).nulls_last(), c.requested_at, c.command_id)
        )
        if status:
            stmt = stmt.where(c.status == status)
        with self._session() as s:
            self._experiment_row(s, experiment_id)
            return [_control(row) for row in s.scalars(stmt)]


def expire_pending(s: Session, exp: ExperimentModel) -> int:
    """End every PENDING command of `exp`, which has just reached a final state, as
    EXPIRED with the reason; in the caller's transaction. Returns how many."""
    now = time.time()
    rows = s.scalars(select(ControlModel).where(ControlModel.experiment_id == exp.id,
                                                ControlModel.status == E.PENDING)).all()
    for row in rows:
        _expire(row, exp, now)
    return len(rows)


def _expire(row: ControlModel, exp: ExperimentModel, now: float) -> None:
    row.message = _expiry(exp.state, exp.last_step, row.at_step)
    row.status = E.EXPIRED
    row.applied_at = now


def _expiry(state: str, last_step: int, at_step: int | None) -> str:
    ended = f"the run ended {state} at step {last_step}"
    if at_step is not None and at_step > last_step:
        return f"{ended} before step {at_step} was reached"
    return f"{ended} before it applied"


def _same_or_conflict(existing, record: ControlRecord) -> ControlRecord:
    """A retry (same kind, value, hold) gets the stored record; other content conflicts.
    `existing` is a row of the controls table (ORM or Core)."""
    if (existing.kind, existing.value, bool(existing.hold), existing.knob or "") == \
            (record.kind, record.value, bool(record.hold), record.knob):
        return _control(existing)
    held = " hold" if existing.hold else ""
    raise AlreadyExists("command", f"{existing.command_id!r} of experiment {existing.experiment_id}",
                        f"as {existing.kind} {existing.value:g}{held}; a retry must repeat kind, value and "
                        "hold (use a new command_id for a new command)")


def _check_one_of(field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")
