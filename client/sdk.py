"""Python SDK: `Client(address, token)` with the same verbs as the CLI.

Returns plain dataclasses (`ExperimentInfo`, `ControlResult`, `Event`, `LogLine`:
client/sdk_types.py, re-exported here), so scripts never touch protobuf enums. gRPC errors surface as `TrainctlError` carrying the status
code name and the server's message.

Conventions: steps and epochs are 0-based indexes here, as on the wire (the CLI shows
epoch *numbers*, index + 1); times are unix seconds (floats).

This module imports no spec models (pydantic) at load: `trainctl get` must start fast.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional, Union

import grpc

from trainctl import controls
from trainctl.client.sdk_types import (  # noqa: F401  (re-exported: import the types from here)
    FINAL, ControlResult, Event, ExperimentInfo, LogLine, events_of)
from trainctl.transport import auth_metadata, open_channel, tls_hint
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
# A Watch stream that breaks before the run ends is reopened from the last row seen;
# codes that no retry can fix (bad id, auth) are raised at once.
FATAL_WATCH_CODES = frozenset({"NOT_FOUND", "INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED",
                               "UNIMPLEMENTED", "FAILED_PRECONDITION"})


class TrainctlError(Exception):
    def __init__(self, code: str, message: str):
        self.code, self.message = code, message
        super().__init__(f"{code}: {message}")


class WaitTimeout(TrainctlError, TimeoutError):
    """`Client.wait` ran out of time before the run reached a final state."""


def _error(exc: grpc.RpcError) -> TrainctlError:
    code, details = exc.code().name, exc.details() or ""
    return TrainctlError(code, details + tls_hint(code, details))


def _backoff(failures: int) -> None:
    """The wait before reopening a stream after `failures` in a row: 0.25 s doubling to 5 s."""
    time.sleep(min(5.0, 0.25 * 2 ** (failures - 1)))


SpecLike = Union[str, Path, dict]


class Client:
    def __init__(self, address: Optional[str] = None, token: Optional[str] = None, *, timeout: float = 30.0):
        self.address = address or os.environ.get("TRAINCTL_SERVER", DEFAULT_ADDRESS)
        self.token = token if token is not None else os.environ.get("TRAINCTL_TOKEN")
        self.timeout = timeout
        self._closed = False
        self._channel = open_channel(self.address)
        self._stub = pb_grpc.ExperimentsStub(self._channel)
        self._artifacts = pb_grpc.ArtifactsStub(self._channel)

    def close(self) -> None:
        self._closed = True
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
            raise _error(exc) from None

    # ------------------------------------------------------------------ experiments
    def submit(self, spec: SpecLike, *, code_dir: Union[str, Path, None] = None, max_code_mb: float = 50,
               progress=None, code_sha256: str = "") -> ExperimentInfo:
        """Submit a spec, or a job spec (a `command`) with its code folder `code_dir`:
        packed, uploaded unless the server has it already (see upload_code), then run.
        `code_sha256`: an archive uploaded before (upload_code) instead of `code_dir`."""
        from trainctl.spec import load_spec_file
        from trainctl.wire import struct_from_dict

        data = spec if isinstance(spec, dict) else load_spec_file(spec)
        if code_dir is not None:
            from trainctl.client.code_sdk import submit_with_code

            return submit_with_code(self, data, code_dir, max_bytes=int(max_code_mb * 1024 * 1024),
                                    progress=progress)[0]
        request = pb.SubmitRequest(spec=struct_from_dict(data), code_sha256=code_sha256)
        return ExperimentInfo.from_pb(self._call("Submit", request, timeout=120))

    # ------------------------------------------------------------------ code and artifacts (client/code_sdk.py)
    def upload_code(self, code_dir: Union[str, Path], *, max_bytes: int = 50 * 1024 * 1024, progress=None):
        """Pack a folder (ignore files honoured) and upload it unless the server has that
        sha256 already. Returns code_sdk.CodeUpload (sha256, size, files, uploaded, ...)."""
        from trainctl.client import code_sdk

        return code_sdk.upload_code(self, code_dir, max_bytes=max_bytes, progress=progress)

    def artifacts(self, id: int, kind: Optional[str] = None) -> list:
        """An experiment's artifacts (0: code archives); kind: code, checkpoint or file."""
        from trainctl.client import code_sdk

        return code_sdk.list_artifacts(self, id, kind)

    def download(self, id: int, name: Optional[str] = None, dest_dir: Union[str, Path] = ".", *,
                 progress_for=None) -> list:
        """Fetch artifact `name` (default: all) of experiment `id` into `dest_dir`;
        [(ArtifactInfo, path)]. Each is checked against its sha256."""
        from trainctl.client import code_sdk

        return code_sdk.download(self, id, name, dest_dir, progress_for)

    def gc(self, dry_run: bool = False) -> dict:
        """Apply checkpoint retention and delete blobs nothing references (dry_run: only say)."""
        from trainctl.client import code_sdk

        return code_sdk.collect_garbage(self, dry_run)

    def get(self, id: int) -> ExperimentInfo:
        return ExperimentInfo.from_pb(self._call("Get", pb.GetRequest(id=id)))

    def list(self, states: Optional[list[str]] = None, limit: Optional[int] = None, *,
             tags: Optional[list[str]] = None, page_size: int = 100) -> list[ExperimentInfo]:
        """Every matching experiment (paged through), at most `limit` of them."""
        out: list[ExperimentInfo] = []
        for x in self.iter_list(states, tags=tags, page_size=page_size):
            if limit is not None and len(out) >= limit:
                break
            out.append(x)
        return out

    def iter_list(self, states: Optional[list[str]] = None, *, tags: Optional[list[str]] = None,
                  page_size: int = 100) -> Iterator[ExperimentInfo]:
        try:
            wanted = [pb.ExperimentState.Value(s.upper()) for s in states or []]
        except ValueError:
            raise ValueError(f"state: must be one of {', '.join(_STATES)}, got {states}") from None
        token = ""
        seen: set[int] = set()
        while True:
            resp = self._call("List", pb.ListRequest(states=wanted, limit=page_size, page_token=token,
                                                     tags=tags or []))
            for m in resp.experiments:
                if m.id not in seen:  # a server without paging repeats nothing: ids are unique
                    seen.add(m.id)
                    yield ExperimentInfo.from_pb(m)
            token = resp.next_page_token
            if not token:
                return

    def cancel(self, id: int, reason: str = "") -> ExperimentInfo:
        """Idempotent: cancelling a run that already ended answers its final state."""
        try:
            return ExperimentInfo.from_pb(self._call("Cancel", pb.CancelRequest(id=id, reason=reason)))
        except TrainctlError as exc:
            if exc.code != "FAILED_PRECONDITION":  # what servers before 0.2 said for a finished run
                raise
            x = self.get(id)
            if not x.is_final:
                raise
            return x

    def replay(self, id: int) -> ExperimentInfo:
        return ExperimentInfo.from_pb(self._call("Replay", pb.ReplayRequest(id=id)))

    def annotate(self, id: int, *, add_tags: tuple = (), remove_tags: tuple = (),
                 note: Optional[str] = None) -> ExperimentInfo:
        req = pb.AnnotateRequest(id=id, add_tags=list(add_tags), remove_tags=list(remove_tags))
        if note is not None:
            req.note = note
        return ExperimentInfo.from_pb(self._call("Annotate", req))

    def watch(self, id: int, from_step: int = 0, live_only: bool = False, *, retries: int = 12,
              timeout: Optional[float] = None) -> Iterator[Event]:
        """History (rows with step >= from_step), then live events, until the run ends.

        If the stream ends or breaks before a final state (server restart, the server
        cutting a slow watcher, a network blip), it is reopened from the last row seen:
        no row is yielded twice and none is skipped. After `retries` failed reopenings
        in a row (backing off 0.25 s doubling to 5 s: about 45 s for 12) TrainctlError
        is raised; it never ends quietly before the final state. `timeout` (s) bounds
        the whole watch (WaitTimeout, code DEADLINE_EXCEEDED)."""
        from trainctl.client.resume import WatchCursor

        cursor = WatchCursor(from_step=from_step, live_only=live_only)
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout("DEADLINE_EXCEEDED", f"experiment {id}: no final state within {timeout:g} s")
            req = pb.WatchRequest(id=id, from_step=cursor.next_from_step, live_only=cursor.next_live_only)
            stream = self._stub.Watch(req, metadata=self._metadata(), timeout=left)
            problem: Optional[TrainctlError] = None
            try:
                for ev in stream:
                    for out in cursor.accept(events_of(ev)):
                        failures = 0
                        yield out
                # The stream ended by itself: after the final state (the server's last
                # event), or cut short without one (then it is reopened).
                if cursor.final:
                    return
            except grpc.RpcError as exc:
                if self._closed:  # the caller closed the client: end quietly
                    return
                problem = _error(exc)
                if problem.code == "DEADLINE_EXCEEDED" and deadline is not None:
                    raise WaitTimeout(problem.code, f"experiment {id}: no final state within {timeout:g} s") \
                        from None
                if problem.code in FATAL_WATCH_CODES:
                    raise problem from None
            finally:
                stream.cancel()
            if self._closed:
                return
            failures += 1
            if failures > retries:
                raise problem or TrainctlError(
                    "UNAVAILABLE", f"watch of experiment {id} ended {failures} times before a final state")
            _backoff(failures)

    def logs(self, id: int, *, follow: bool = False, tail: int = 0, attempt: int = 0,
             retries: int = 12) -> Iterator[LogLine]:
        """The run's stored output lines (the last `tail`; only attempt `attempt` if not 0)
        in (attempt, index) order; with `follow`, then new lines until the run ends. A
        followed stream that breaks is reopened (up to `retries` times in a row, backing
        off) and lines already yielded are skipped."""
        last = (0, 0)
        failures = 0
        while True:
            req = pb.LogsRequest(id=id, follow=follow, tail=tail if last == (0, 0) else 0, attempt=attempt)
            try:
                for batch in self._stub.Logs(req, timeout=None if follow else max(self.timeout, 300.0),
                                             metadata=self._metadata()):
                    failures = 0
                    for m in batch.lines:
                        key = (m.attempt, m.index)
                        if m.index and key <= last:
                            continue  # yielded before a reopen
                        if not m.index and last != (0, 0):
                            continue  # the "dropped" marker of a reopened stream
                        if m.index:
                            last = key
                        yield LogLine.from_pb(m)
                return
            except grpc.RpcError as exc:
                err = _error(exc)
                if not follow or err.code in FATAL_WATCH_CODES or self._closed or failures >= retries:
                    raise err from None
            failures += 1
            _backoff(failures)

    def wait(self, id: int, timeout: Optional[float] = None) -> ExperimentInfo:
        """Block until the experiment reaches a final state and return it; WaitTimeout
        (a TrainctlError and a TimeoutError) if `timeout` seconds pass first. Never
        returns a state that is not final."""
        for ev in self.watch(id, live_only=True, timeout=timeout):
            if ev.kind == "experiment" and ev.experiment.is_final:
                return ev.experiment
        x = self.get(id)  # the watch ended on a final state the cursor saw; read it back
        if x.is_final:
            return x
        raise TrainctlError("UNAVAILABLE", f"experiment {id}: watch ended with the run {x.state}")

    def metrics(self, id: int, *, scope: Optional[str] = None, names: Optional[list[str]] = None,
                from_step: int = 0, to_step: int = 0, max_points: int = 0) -> dict[str, dict[str, list]]:
        """{"STEP/loss": {"step": [...], "epoch": [...], "value": [...]}, ...}"""
        try:
            sc = pb.Scope.Value(scope.upper()) if scope else 0
        except ValueError:
            raise ValueError(f"scope: must be step or epoch, got {scope!r}") from None
        req = pb.GetMetricsRequest(id=id, scope=sc, names=names or [], from_step=from_step, to_step=to_step,
                                   max_points=max_points)
        resp = self._call("GetMetrics", req, timeout=120)
        return {f"{pb.Scope.Name(s.scope)}/{s.name}": {"step": list(s.steps), "epoch": list(s.epochs),
                                                       "value": list(s.values)} for s in resp.series}

    def history(self, id: int, *, from_step: int = 0) -> Iterator[Event]:
        """The stored rows (with their wall times) and resolved controls, without
        waiting for a running experiment: ends once the history is read. GetMetrics
        series carry no wall times; Watch rows do."""
        from trainctl.client.resume import read_history

        return read_history(self, id, from_step)

    def controls(self, id: int) -> list[ControlResult]:
        resp = self._call("ListControls", pb.ListControlsRequest(experiment_id=id))
        return [ControlResult.from_pb(r) for r in resp.records]

    # ------------------------------------------------------------------ steering
    def control(self, id: int, kind: str, value: float, *, wait: float = 10.0, command_id: Optional[str] = None,
                dry_run: bool = False, hold: bool = False, knob: str = "") -> ControlResult:
        try:  # any enum name (UNSPECIFIED too: the server says why it refuses it)
            k = pb.ControlKind.Value(kind.upper())
        except ValueError:
            raise ValueError(f"kind: unknown control kind {kind!r}") from None
        req = pb.ControlRequest(experiment_id=id, kind=k, value=value, wait_seconds=wait,
                                command_id=command_id or uuid.uuid4().hex, dry_run=dry_run, hold=hold, knob=knob)
        return ControlResult.from_pb(self._call("Control", req, timeout=wait + 30))

    def set_lr(self, id: int, lr: float, **kw) -> ControlResult:
        return self.control(id, "SET_LR", lr, **kw)

    def scale_lr(self, id: int, factor: float, **kw) -> ControlResult:
        return self.control(id, "SCALE_LR", factor, **kw)

    def set(self, id: int, name: str, value: float, **kw) -> ControlResult:
        """Set knob `name` of run `id` (one the run declared; the server checks its bounds)."""
        return self.control(id, "SET_KNOB", value, knob=name, **kw)

    def set_decay(self, id: int, value: float, target: str = "lr", **kw) -> ControlResult:
        kinds = controls.DECAY_TARGETS
        if target not in kinds:
            raise ValueError(f"target: must be one of {', '.join(kinds)}, got {target!r}")
        return self.control(id, kinds[target], value, **kw)


_STATES = tuple(n for n in pb.ExperimentState.keys() if n != "EXPERIMENT_STATE_UNSPECIFIED")
