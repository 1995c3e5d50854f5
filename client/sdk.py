"""Python SDK: `Client(address, token)` with the same verbs as the CLI.

Returns plain dataclasses (`ExperimentInfo`, `ControlResult`, `Event`), so scripts
never touch protobuf enums. gRPC errors surface as `TrainctlError` carrying the status
code name and the server's message.
"""
from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import grpc

from trainctl.spec import load_spec_file
from trainctl.transport import auth_metadata, open_channel
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.wire import dict_from_struct, struct_from_dict

DEFAULT_ADDRESS = "127.0.0.1:50051"
FINAL = ("COMPLETED", "FAILED", "CANCELLED")


class TrainctlError(Exception):
    def __init__(self, code: str, message: str):
        self.code, self.message = code, message
        super().__init__(f"{code}: {message}")


def _ts(ts) -> Optional[float]:
    return ts.ToNanoseconds() / 1e9 if ts.seconds or ts.nanos else None


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

    @classmethod
    def from_pb(cls, m: pb.Experiment) -> "ExperimentInfo":
        return cls(id=m.id, name=m.name, state=pb.ExperimentState.Name(m.state),
                   spec=dict_from_struct(m.spec), attempt=m.attempt, worker_id=m.worker_id,
                   message=m.message, summary=dict(m.summary), last_step=m.last_step,
                   created_at=_ts(m.created_at), started_at=_ts(m.started_at), finished_at=_ts(m.finished_at),
                   replay_of=m.replay_of)

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

    @classmethod
    def from_pb(cls, m: pb.ControlRecord) -> "ControlResult":
        def opt(v: float) -> Optional[float]:
            return None if math.isnan(v) else v

        return cls(command_id=m.command_id, experiment_id=m.experiment_id, kind=pb.ControlKind.Name(m.kind),
                   value=m.value, status=pb.ControlStatus.Name(m.status), source=pb.ControlSource.Name(m.source),
                   applied_step=m.applied_step if m.applied_step >= 0 else None, old_value=opt(m.old_value),
                   new_value=opt(m.new_value), message=m.message, requested_at=_ts(m.requested_at),
                   applied_at=_ts(m.applied_at), at_step=m.at_step if m.at_step >= 0 else None)


@dataclass(frozen=True)
class Event:
    """One watch event. kind: "experiment" (state), "step" / "epoch" (one metric row),
    or "control" (a resolved command)."""

    kind: str
    experiment: Optional[ExperimentInfo] = None
    step: int = 0
    epoch: int = 0
    wall_time: float = 0.0
    values: dict = field(default_factory=dict)
    control: Optional[ControlResult] = None


SpecLike = Union[str, Path, dict]


class Client:
    def __init__(self, address: Optional[str] = None, token: Optional[str] = None, *, timeout: float = 30.0):
        self.address = address or os.environ.get("TRAINCTL_SERVER", DEFAULT_ADDRESS)
        self.token = token if token is not None else os.environ.get("TRAINCTL_TOKEN")
        self.timeout = timeout
        self._channel = open_channel(self.address)
        self._stub = pb_grpc.ExperimentsStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _metadata(self):
        return auth_metadata(self.token)

    def _call(self, method: str, request, timeout: Optional[float] = None):
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata())
        except grpc.RpcError as exc:
            raise TrainctlError(exc.code().name, exc.details() or "") from None

    # ------------------------------------------------------------------ experiments
    def submit(self, spec: SpecLike) -> ExperimentInfo:
        data = spec if isinstance(spec, dict) else load_spec_file(spec)
        return ExperimentInfo.from_pb(self._call("Submit", pb.SubmitRequest(spec=struct_from_dict(data)), timeout=120))

    def get(self, id: int) -> ExperimentInfo:
        return ExperimentInfo.from_pb(self._call("Get", pb.GetRequest(id=id)))

    def list(self, states: Optional[list[str]] = None, limit: int = 100) -> list[ExperimentInfo]:
        req = pb.ListRequest(states=[pb.ExperimentState.Value(s.upper()) for s in states or []], limit=limit)
        return [ExperimentInfo.from_pb(m) for m in self._call("List", req).experiments]

    def cancel(self, id: int, reason: str = "") -> ExperimentInfo:
        return ExperimentInfo.from_pb(self._call("Cancel", pb.CancelRequest(id=id, reason=reason)))

    def replay(self, id: int) -> ExperimentInfo:
        return ExperimentInfo.from_pb(self._call("Replay", pb.ReplayRequest(id=id)))

    def watch(self, id: int, from_step: int = 0, live_only: bool = False) -> Iterator[Event]:
        """History (rows with step >= from_step), then live events, until the run ends."""
        stream = self._stub.Watch(pb.WatchRequest(id=id, from_step=from_step, live_only=live_only),
                                  metadata=self._metadata())
        try:
            for ev in stream:
                yield from _events(ev)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise TrainctlError(exc.code().name, exc.details() or "") from None
        finally:
            stream.cancel()

    def wait(self, id: int, timeout: Optional[float] = None) -> ExperimentInfo:
        """Block until the experiment reaches a final state."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        for ev in self.watch(id, live_only=True):
            if ev.kind == "experiment" and ev.experiment.is_final:
                return ev.experiment
            if deadline and time.monotonic() > deadline:
                break
        return self.get(id)

    def metrics(self, id: int, *, scope: Optional[str] = None, names: Optional[list[str]] = None,
                from_step: int = 0, to_step: int = 0, max_points: int = 0) -> dict[str, dict[str, list]]:
        """{"STEP/loss": {"step": [...], "epoch": [...], "value": [...]}, ...}"""
        req = pb.GetMetricsRequest(id=id, scope=pb.Scope.Value(scope.upper()) if scope else 0, names=names or [],
                                   from_step=from_step, to_step=to_step, max_points=max_points)
        resp = self._call("GetMetrics", req, timeout=120)
        return {f"{pb.Scope.Name(s.scope)}/{s.name}": {"step": list(s.steps), "epoch": list(s.epochs),
                                                       "value": list(s.values)} for s in resp.series}

    def controls(self, id: int) -> list[ControlResult]:
        resp = self._call("ListControls", pb.ListControlsRequest(experiment_id=id))
        return [ControlResult.from_pb(r) for r in resp.records]

    # ------------------------------------------------------------------ steering
    def control(self, id: int, kind: str, value: float, *, wait: float = 10.0,
                command_id: Optional[str] = None) -> ControlResult:
        req = pb.ControlRequest(experiment_id=id, kind=pb.ControlKind.Value(kind.upper()), value=value,
                                wait_seconds=wait, command_id=command_id or uuid.uuid4().hex)
        return ControlResult.from_pb(self._call("Control", req, timeout=wait + 30))

    def set_lr(self, id: int, lr: float, **kw) -> ControlResult:
        return self.control(id, "SET_LR", lr, **kw)

    def scale_lr(self, id: int, factor: float, **kw) -> ControlResult:
        return self.control(id, "SCALE_LR", factor, **kw)

    def set_decay(self, id: int, value: float, target: str = "lr", **kw) -> ControlResult:
        kinds = {"lr": "SET_LR_DECAY", "ema": "SET_EMA_DECAY", "weight": "SET_WEIGHT_DECAY"}
        if target not in kinds:
            raise ValueError(f"target: must be one of {', '.join(kinds)}, got {target!r}")
        return self.control(id, kinds[target], value, **kw)


def _events(ev: pb.WatchEvent) -> Iterator[Event]:
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
