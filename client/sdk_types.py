"""The SDK's plain data types: `ExperimentInfo`, `ControlResult`, `Event`, `LogLine`,
each built from its protobuf message by `from_pb` (enums become their names), so
scripts never touch protobuf. Re-exported by client/sdk.py: import them from there.

Conventions: steps and epochs are 0-based indexes here, as on the wire (the CLI shows
epoch *numbers*, index + 1); times are unix seconds (floats).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

from trainctl.v1 import trainctl_pb2 as pb
from trainctl.wire import dict_from_struct

FINAL = ("COMPLETED", "FAILED", "CANCELLED")
# Summary values are doubles on the wire; these keys are counts.
INT_SUMMARY_KEYS = frozenset({"steps", "epochs", "best_epoch", "restarts"})


def _ts(msg, name: str) -> Optional[float]:
    if not msg.HasField(name):
        return None
    ts = getattr(msg, name)
    return ts.ToNanoseconds() / 1e9


def spec_of(m: pb.Experiment) -> dict:
    """The spec with its declared types: `spec_json` when the server sends it (integers
    stay integers), else the Struct (every number a float)."""
    if m.spec_json:
        try:
            return json.loads(m.spec_json)
        except ValueError:
            pass
    return dict_from_struct(m.spec)  # numbers stay floats: the Struct has no ints


def summary_of(m: pb.Experiment) -> dict:
    return {k: int(v) if k in INT_SUMMARY_KEYS and math.isfinite(v) and v == int(v) else v
            for k, v in m.summary.items()}


@dataclass(frozen=True)
class ExperimentInfo:
    id: int
    name: str
    state: str
    spec: dict
    attempt: int
    worker_id: str
    message: str
    summary: dict
    last_step: int
    created_at: Optional[float]
    started_at: Optional[float]
    finished_at: Optional[float]
    replay_of: int
    tags: tuple = ()
    note: str = ""
    kind: str = "SPEC"  # SPEC, ATTACHED (the user's own loop) or CODE
    code_sha256: str = ""  # CODE: the archive it runs
    # Steerable values, from Get: ({"name", "value", "low", "high"}, ...); low/high None when unbounded.
    knobs: tuple = ()

    @classmethod
    def from_pb(cls, m: pb.Experiment) -> "ExperimentInfo":
        return cls(id=m.id, name=m.name, state=pb.ExperimentState.Name(m.state), spec=spec_of(m),
                   attempt=m.attempt, worker_id=m.worker_id, message=m.message, summary=summary_of(m),
                   last_step=m.last_step, created_at=_ts(m, "created_at"), started_at=_ts(m, "started_at"),
                   finished_at=_ts(m, "finished_at"), replay_of=m.replay_of, tags=tuple(m.tags), note=m.note,
                   kind=pb.ExperimentKind.Name(m.kind) if m.kind else "SPEC", code_sha256=m.code_sha256,
                   knobs=tuple({"name": k.name, "value": k.value, "low": k.low if k.HasField("low") else None,
                                "high": k.high if k.HasField("high") else None} for k in m.knobs))

    @property
    def is_final(self) -> bool:
        return self.state in FINAL


@dataclass(frozen=True)
class ControlResult:
    command_id: str
    experiment_id: int
    kind: str
    value: float
    status: str
    source: str
    applied_step: Optional[int]
    old_value: Optional[float]
    new_value: Optional[float]
    message: str
    requested_at: Optional[float]
    applied_at: Optional[float]
    at_step: Optional[int]
    consequence: str = ""
    hold: bool = False
    knob: str = ""  # SET_KNOB: the knob's name

    @classmethod
    def from_pb(cls, m: pb.ControlRecord) -> "ControlResult":
        def opt(v: float) -> Optional[float]:
            return None if math.isnan(v) else v

        # at_step is proto3 `optional` (unset for LIVE); older servers sent -1 instead.
        at_step = m.at_step if m.HasField("at_step") and m.at_step >= 0 else None
        return cls(command_id=m.command_id, experiment_id=m.experiment_id, kind=pb.ControlKind.Name(m.kind),
                   value=m.value, status=pb.ControlStatus.Name(m.status), source=pb.ControlSource.Name(m.source),
                   applied_step=m.applied_step if m.applied_step >= 0 and m.status in _STEPPED else None,
                   old_value=opt(m.old_value), new_value=opt(m.new_value), message=m.message,
                   requested_at=_ts(m, "requested_at"), applied_at=_ts(m, "applied_at"), at_step=at_step,
                   consequence=m.consequence, hold=m.hold, knob=m.knob)


@dataclass(frozen=True)
class Event:
    """One watch event. kind: "experiment" (state), "step" / "epoch" (one metric row),
    or "control" (a resolved command). `epoch` is the 0-based index."""

    kind: str
    experiment: Optional[ExperimentInfo] = None
    step: int = 0
    epoch: int = 0
    wall_time: float = 0.0
    values: dict = field(default_factory=dict)
    control: Optional[ControlResult] = None


@dataclass(frozen=True)
class LogLine:
    """One line of a run's captured output. stream: STDOUT, STDERR, LOGGING (a spec run's
    Python logging) or SYSTEM (trainctl's own, e.g. "N earlier lines dropped", index 0).
    `index` counts from 1 per attempt; `wall_time` is when the worker read the line."""

    attempt: int
    index: int
    stream: str
    wall_time: float
    text: str

    @classmethod
    def from_pb(cls, m: pb.LogLine) -> "LogLine":
        stream = pb.LogStream.Name(m.stream) if m.stream in pb.LogStream.values() else "STDOUT"
        return cls(attempt=m.attempt, index=m.index, stream=stream, wall_time=m.wall_time, text=m.text)


_STEPPED = (pb.APPLIED, pb.REJECTED)  # statuses whose applied_step means something


def events_of(ev: pb.WatchEvent) -> Iterator[Event]:
    which = ev.WhichOneof("event")
    if which == "experiment":
        yield Event("experiment", experiment=ExperimentInfo.from_pb(ev.experiment))
    elif which == "control":
        yield Event("control", control=ControlResult.from_pb(ev.control))
    elif which == "metrics":
        kind = "step" if ev.metrics.scope == pb.STEP else "epoch"
        names = list(ev.metrics.names)
        for r in ev.metrics.rows:
            values = {n: v for n, v in zip(names, r.values) if not math.isnan(v)}
            yield Event(kind, step=r.step, epoch=r.epoch, wall_time=r.wall_time, values=values)
