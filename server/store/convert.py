"""Rows to entities: the store hands out plain dataclasses, never ORM objects."""

from __future__ import annotations

from .entities import ControlRecord, Experiment, Worker
from .tables import ControlModel, ExperimentModel, WorkerModel


def experiment(row: ExperimentModel) -> Experiment:
    return Experiment(
        id=row.id,
        name=row.name,
        state=row.state,
        spec=row.spec,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        attempt=row.attempt,
        worker_id=row.worker_id,
        message=row.message,
        summary=dict(row.summary or {}),
        last_step=row.last_step,
        max_restarts=row.max_restarts,
        restarts=row.restarts,
        gpus=row.gpus,
        replay_of=row.replay_of,
        tags=tuple(t.tag for t in row.tag_rows),
        note=row.note or "",
        kind=row.kind or "SPEC",
        run_token_hash=row.run_token_hash,
    )


def control(row: ControlModel) -> ControlRecord:
    return ControlRecord(
        command_id=row.command_id,
        experiment_id=row.experiment_id,
        kind=row.kind,
        value=row.value,
        status=row.status,
        source=row.source,
        requested_at=row.requested_at,
        applied_at=row.applied_at,
        applied_step=row.applied_step,
        old_value=row.old_value,
        new_value=row.new_value,
        message=row.message,
        at_step=row.at_step,
        consequence=row.consequence or "",
        hold=bool(row.hold),
        knob=row.knob or "",
    )


def worker(row: WorkerModel) -> Worker:
    return Worker(
        id=row.id,
        hostname=row.hostname,
        devices=list(row.devices or []),
        connected=bool(row.connected),
        last_seen=row.last_seen,
    )
