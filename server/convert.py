"""Store entities <-> wire messages. The gRPC layer never sees ORM rows, and the store
never sees protobuf."""
from __future__ import annotations

import json
import math

from google.protobuf.timestamp_pb2 import Timestamp

from trainctl.server.store import entities as e
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.wire import struct_from_dict


def _ts(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def experiment_to_pb(x: e.Experiment, knobs: list[e.Knob] | None = None) -> pb.Experiment:
    """`knobs`: the run's steerable values (Get fills them; lists leave them out)."""
    msg = pb.Experiment(
        id=x.id, name=x.name, state=pb.ExperimentState.Value(x.state), spec=struct_from_dict(x.spec),
        attempt=x.attempt, worker_id=x.worker_id or "", message=x.message or "",
        summary={k: float(v) for k, v in (x.summary or {}).items()}, last_step=x.last_step,
        replay_of=x.replay_of or 0, tags=list(x.tags), note=x.note or "",
        # The stored spec is the validated model's JSON dump: its ints are ints (a Struct
        # makes every number a double).
        spec_json=json.dumps(x.spec, separators=(",", ":")),
        kind=pb.ExperimentKind.Value(x.kind or e.SPEC),
        knobs=[knob_to_pb(k) for k in knobs or ()],
        # A CODE run's archive: in its job spec (set by the server at Submit), not a column.
        code_sha256=str((x.spec or {}).get("code_sha256") or "") if x.kind == e.CODE else "",
    )
    for field, value in (("created_at", x.created_at), ("started_at", x.started_at), ("finished_at", x.finished_at)):
        ts = _ts(value)
        if ts is not None:
            getattr(msg, field).CopyFrom(ts)
    return msg


def control_to_pb(r: e.ControlRecord) -> pb.ControlRecord:
    msg = pb.ControlRecord(
        command_id=r.command_id, experiment_id=r.experiment_id, kind=pb.ControlKind.Value(r.kind),
        value=r.value, status=pb.ControlStatus.Value(r.status), source=pb.ControlSource.Value(r.source),
        applied_step=r.applied_step if r.applied_step is not None else -1,
        old_value=_nan_if_none(r.old_value), new_value=_nan_if_none(r.new_value), message=r.message or "",
        consequence=r.consequence or "", hold=bool(r.hold), knob=r.knob or "",
    )
    if r.at_step is not None:  # optional on the wire: unset for LIVE commands
        msg.at_step = r.at_step
    msg.requested_at.CopyFrom(_ts(r.requested_at))
    if r.applied_at is not None:
        msg.applied_at.CopyFrom(_ts(r.applied_at))
    return msg


def knob_to_pb(k: e.Knob) -> pb.Knob:
    return pb.Knob(name=k.name, value=k.value, low=k.low, high=k.high)  # None: the optional stays unset


def knob_from_pb(k: pb.Knob) -> e.Knob:
    return e.Knob(name=k.name, value=k.value, low=k.low if k.HasField("low") else None,
                  high=k.high if k.HasField("high") else None)


def stop_message(experiment_id: int, attempt: int, kind: int, reason: str) -> pb.ServerMessage:
    """The one way the server tells a worker to stop a run: CancelRun with a typed kind
    (pb.STOP_CANCELLED: a client cancelled; pb.STOP_FENCED: this attempt no longer holds
    the lease, drop it and its unsent data) and a reason for people and logs."""
    return pb.ServerMessage(cancel=pb.CancelRun(experiment_id=experiment_id, attempt=attempt, reason=reason,
                                                kind=kind))


def _nan_if_none(v: float | None) -> float:
    return math.nan if v is None else float(v)


def rows_to_batches(experiment_id: int, rows: list[e.MetricRow]) -> list[pb.MetricBatch]:
    """History rows regrouped into MetricBatch messages (one per run of rows that share
    scope and column names), the same shape live events have."""
    batches: list[pb.MetricBatch] = []
    current: pb.MetricBatch | None = None
    for r in rows:
        names = sorted(r.values)
        if current is None or current.scope != pb.Scope.Value(r.scope) or list(current.names) != names \
                or len(current.rows) >= 1000:
            current = pb.MetricBatch(experiment_id=experiment_id, scope=pb.Scope.Value(r.scope), names=names)
            batches.append(current)
        current.rows.add(step=r.step, epoch=r.epoch, wall_time=r.wall_time, values=[r.values[n] for n in names])
    return batches
