"""The network side of an attached run, on background threads: Attach (retried with
backoff while the server is unreachable), the Connect stream (hello with the run token,
resends, heartbeats), and delivery of the loop's rows. Nothing here raises into the
user's loop; problems are logged once and retried.

The loop hands over rows and takes commands through two deques (appends and pops are
atomic), so `run.step()`/`run.log()` never wait on this side.
"""
from __future__ import annotations

import json
import logging
import os
import random
import secrets
import socket
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

import grpc
from google.protobuf import struct_pb2

from trainctl.attach.rows import batches, rows_to_plain
from trainctl.outbox import Outbox
from trainctl.transport import auth_metadata, open_channel
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

log = logging.getLogger("trainctl.attach")

# Rows are converted and sent this often. The server's CPU per batch (its transaction,
# fan-out, ack) is paid on the training box when both share it; with a watcher, 1 s
# instead of 0.2 s took server + watcher CPU per step down 1.4-4x (bench/RESULTS.md). A
# watcher's view lags <= ~1 s (finish() flushes at once).
LINGER_S = 1.0
IN_MEMORY_BATCHES = 200    # sealed batches kept in RAM during an outage; older ones go to disk
PRE_ATTACH_IN_MEMORY = 20_000  # rows kept in RAM before the run exists on the server
ACK_HANDOVER_S = 0.005     # at most this pause of the loop per applied command (Outbox.hand_over)
_FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
          grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)


class _PreAttach:
    """Rows logged before the server knew the run: bounded memory, then a JSON-lines file."""

    def __init__(self, spill_path: Path):
        self.rows: list[tuple] = []
        self.path = spill_path
        self.spilled = 0

    def add(self, rows: list[tuple]) -> None:
        self.rows.extend(rows)
        if len(self.rows) > PRE_ATTACH_IN_MEMORY:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                for r in self.rows:
                    f.write(json.dumps(r) + "\n")
            self.spilled += len(self.rows)
            self.rows = []

    def take(self) -> list[tuple]:
        rows = []
        if self.spilled:
            with open(self.path) as f:
                rows = [tuple(json.loads(line)) for line in f]
            self.path.unlink(missing_ok=True)
            self.spilled = 0
        rows, self.rows = rows + self.rows, []
        return rows

    def drop(self) -> None:
        self.rows, self.spilled = [], 0
        self.path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.rows) + self.spilled


class Session:
    def __init__(self, *, server: str, token: Optional[str], name: str, config: dict, tags: list[str],
                 replay_of: int, rows: deque, commands: deque, step: Callable[[], int],
                 knobs: Callable[[], list], spill_dir: Optional[str] = None):
        self.server, self.token = server, token
        struct = struct_pb2.Struct()
        struct.update(config)  # (not trainctl.wire: that imports the spec models, which the SDK does not need)
        self.request = pb.AttachRequest(name=name, config=struct, tags=tags, replay_of=replay_of)
        # The attach key (server/attach.py): an Attach retried after a lost reply finds
        # the run it created instead of making a second one. It is also the run token.
        self.attach_metadata = (("trainctl-attach-key", secrets.token_urlsafe(32)), *(auth_metadata(token) or ()))
        self.rows, self.commands = rows, commands
        self._step, self._knobs = step, knobs
        spill = Path(spill_dir or tempfile.gettempdir()) / f"trainctl-attach-{os.getpid()}-{random.getrandbits(32):08x}"
        self.outbox = Outbox(in_memory_batches=IN_MEMORY_BATCHES, spill_path=spill.with_suffix(".bin"))
        self.pre = _PreAttach(spill.with_suffix(".jsonl"))
        self.attached: Optional[pb.AttachResponse] = None
        self.experiment_id = 0
        self.attempt = 0
        self.fenced = False
        self.cancelled = ""          # the server's reason when a client cancelled the run
        self.gave_up = ""            # why the session stopped trying (bad token, refused request...)
        self.heartbeat_interval = 2.0
        self.stopping = threading.Event()   # finish: stop reconnecting
        self._stream_open = False
        self._seal_lock = threading.Lock()
        self._pump_lock = threading.Lock()
        self._stream_stop: Optional[threading.Event] = None
        self._connected = threading.Event()
        self._running_sent = False
        self._final_sent = False
        self._final_stored = False   # the server said so (BatchAck.final)
        self._complete_at_fence = False
        self._said_unreachable = False
        self._threads = [threading.Thread(target=self._connect_forever, name="trainctl-attach", daemon=True),
                         threading.Thread(target=self._pump_forever, name="trainctl-rows", daemon=True)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ sending
    def send(self, msg: pb.WorkerMessage, *, sticky: bool = False) -> None:
        if self.experiment_id and not self.fenced:
            self.outbox.send(msg, sticky=sticky)

    def ack(self, command_id: str, outcome, applied_step: int) -> None:
        self.send(pb.WorkerMessage(ack=pb.ControlAck(
            experiment_id=self.experiment_id, attempt=self.attempt, command_id=command_id, ok=outcome.ok,
            applied_step=applied_step, old_value=outcome.old, new_value=outcome.new, message=outcome.message,
            consequence=outcome.consequence)), sticky=True)
        if self._connected.is_set():  # the loop's thread pauses (<= ACK_HANDOVER_S) so the ack leaves now
            self.outbox.hand_over(ACK_HANDOVER_S)

    def declare_knobs(self) -> None:
        knobs = self._knobs()
        if knobs and not self._final_sent:  # after the final state the server refuses it
            self.send(pb.WorkerMessage(knobs=pb.KnobDeclaration(
                experiment_id=self.experiment_id, attempt=self.attempt, knobs=[k.as_pb() for k in knobs])))

    def pump(self) -> None:
        """Move the loop's rows on: converted, then to the outbox (or the pre-attach buffer).
        One pump at a time (the pump thread, finish, registration), so rows keep their order."""
        with self._pump_lock:
            self._pump()

    def _pump(self) -> None:
        raw = []
        while self.rows:
            raw.append(self.rows.popleft())
        if raw:
            if self.fenced:
                return
            if not self.experiment_id:
                self.pre.add(rows_to_plain(raw))
                return
            self._enqueue(raw)
        with self._seal_lock:
            if not self._stream_open and self.experiment_id:
                self.outbox.seal_queued()

    def _enqueue(self, raw: list[tuple]) -> None:
        """Rows as sealed metric batches, queued in order behind what was sent before.
        (Built here from columns, rows.py, not row by row in Outbox.add_rows: that costs
        the loop several microseconds a step. Outbox._seal gives the batch its seq and
        keeps it until acked, as for the batches the outbox builds itself.)"""
        for batch in batches(raw, self.experiment_id, self.attempt):
            self.outbox.send(self.outbox._seal(batch))

    def _pump_forever(self) -> None:
        while not self.stopping.is_set():
            self.stopping.wait(LINGER_S)
            try:
                self.pump()
            except Exception:  # never let this thread die: log and keep going
                log.exception("trainctl: delivering rows failed")

    # ------------------------------------------------------------------ attach and connect
    def _attach(self, stub) -> bool:
        try:
            resp = stub.Attach(self.request, metadata=self.attach_metadata, timeout=10)
        except grpc.RpcError as exc:
            if exc.code() in _FATAL:
                self._give_up(f"the server refused to attach this run: {exc.code().name}: {exc.details()}")
            else:  # said once as a warning, then quietly retried
                (log.info if self._said_unreachable else log.warning)(
                    "trainctl: server %s not reachable (%s); the loop keeps going and the run is registered "
                    "when the server answers", self.server, exc.code().name)
                self._said_unreachable = True
            return False
        self.attached = resp
        self.attempt = resp.attempt
        self.heartbeat_interval = resp.heartbeat_interval_s or self.heartbeat_interval
        for rec in resp.controls:  # replayed commands (replay_of): applied at their steps by the loop
            self.commands.append(rec)
        with self._pump_lock:  # rows logged before registration go first, in order
            self.experiment_id = resp.experiment.id
            early = self.pre.take()
            if early:
                self._enqueue(early)
        log.info("trainctl: attached as experiment %d (%s)", self.experiment_id, resp.experiment.name)
        return True

    def _hello(self) -> pb.WorkerMessage:
        hello = pb.Hello(worker_id=self.attached.worker_id, hostname=socket.gethostname(), version="0.1.0",
                         run_token=self.attached.run_token,
                         current=self._heartbeat())
        return pb.WorkerMessage(hello=hello)

    def _heartbeat(self) -> pb.Heartbeat:
        return pb.Heartbeat(experiment_id=self.experiment_id, attempt=self.attempt, step=self._step())

    def _connect_forever(self) -> None:
        backoff = 0.2
        while not self.stopping.is_set() and not self.gave_up and not self.fenced:
            channel = open_channel(self.server, (("grpc.keepalive_time_ms", 10_000),))
            stop = threading.Event()
            try:
                stub = pb_grpc.WorkersStub(channel)
                if self.attached is None and not self._attach(pb_grpc.ExperimentsStub(channel)):
                    raise _Retry()
                with self._seal_lock:
                    self._stream_open = True
                    self._stream_stop = stop
                responses = stub.Connect(self.outbox.stream(self._hello, self._heartbeat, self.heartbeat_interval,
                                                            stop), metadata=auth_metadata(self.token))
                for msg in responses:
                    backoff = 0.2
                    self._on_message(msg)
                if not self.stopping.is_set():
                    log.info("trainctl: the server closed the stream; reconnecting")
            except _Retry:
                pass
            except grpc.RpcError as exc:
                if exc.code() in _FATAL:
                    self._give_up(f"the server refused this run's stream: {exc.code().name}: {exc.details()}")
                elif not self.stopping.is_set():
                    log.info("trainctl: stream to %s broke (%s); reconnecting", self.server, exc.code().name)
            except Exception:
                log.exception("trainctl: connection error; reconnecting")
            finally:
                with self._seal_lock:
                    self._stream_open = False
                stop.set()
                self._connected.clear()
                channel.close()
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 5.0) * (0.8 + 0.4 * random.random())

    def _on_message(self, msg: pb.ServerMessage) -> None:
        kind = msg.WhichOneof("msg")
        if kind == "welcome":
            self.heartbeat_interval = msg.welcome.heartbeat_interval_s or self.heartbeat_interval
            if not self._running_sent and not self._final_sent:
                # Sticky under the same key as the final state, which replaces it.
                self._running_sent = True
                self.send(pb.WorkerMessage(state=pb.StateUpdate(experiment_id=self.experiment_id,
                                                                attempt=self.attempt, state=pb.RUNNING)), sticky=True)
            self.declare_knobs()  # again on every connect: the server may have restarted
            self._connected.set()
        elif kind == "batch_ack":
            a = msg.batch_ack
            if a.final and (a.experiment_id, a.attempt) == (self.experiment_id, self.attempt):
                self._final_stored = True  # before the ack empties the outbox: finish() reads both
            self.outbox.acked(a.experiment_id, a.attempt, a.seq)
        elif kind in ("control", "cancel"):
            body = getattr(msg, kind)
            if (body.experiment_id, body.attempt) != (self.experiment_id, self.attempt):
                return
            if kind == "control":
                self.commands.append(body)
            elif body.kind == pb.STOP_FENCED:
                (log.info if self._final_sent else log.warning)(
                    "trainctl: the server fenced this run (%s); nothing more is sent", body.reason)
                # Fenced after the final state left with nothing else queued: the server
                # has it all (it fences what follows, e.g. a heartbeat of the ended run).
                # (The server handles a stream in order: with the state taken off the queue,
                # the batches before it were processed, whether or not their ack came back.)
                self._complete_at_fence = self._final_sent and self.outbox.pending() == len(self.outbox.unacked)
                self.fenced = True
                self.outbox.forget(self.experiment_id, self.attempt)
                if self._stream_stop is not None:
                    self._stream_stop.set()
            else:
                log.warning("trainctl: experiment %d was cancelled: %s (run.cancelled is now set)",
                            self.experiment_id, body.reason or "by a client")
                self.cancelled = body.reason or "cancelled"

    def _give_up(self, why: str) -> None:
        self.gave_up = why
        log.warning("trainctl: %s; the loop keeps running without the server", why)

    def wait_attached(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.experiment_id and not self.gave_up and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(self.experiment_id)

    # ------------------------------------------------------------------ the end
    def finish(self, state: int, message: str, timeout: float) -> list[str]:
        """Send the final state, wait up to `timeout` for everything to be acknowledged,
        stop the threads. Returns what could not be delivered (empty: everything was)."""
        deadline = time.monotonic() + timeout
        self.pump()
        while not self.experiment_id and not self.gave_up and time.monotonic() < deadline:
            time.sleep(0.05)
        self.pump()
        self._final_sent = True
        self.send(pb.WorkerMessage(state=pb.StateUpdate(experiment_id=self.experiment_id, attempt=self.attempt,
                                                        state=state, message=message)), sticky=True)
        # Short polls: a script's end waits for this. The server acks at once after a final
        # state, with BatchAck.final: everything is stored.
        while time.monotonic() < deadline and self.experiment_id and not self.fenced and not self.gave_up:
            if self._final_stored or (self._connected.is_set() and self.outbox.pending() == 0):
                break
            time.sleep(0.005)
        drained = self.experiment_id and not self.fenced and self._connected.is_set() and self.outbox.pending() == 0
        # Out of the outbox is not stored: without the final ack (nothing was pending, so
        # the loop above ended before it came) the final state counts as delivered once
        # the server reports it (its metrics were acked before it, in stream order).
        delivered = self._final_stored or self._complete_at_fence or (drained and self._confirmed(state, deadline))
        self.stopping.set()
        stop = self._stream_stop
        if stop is not None:
            stop.set()  # half-closes the stream: the server reads what was sent, then ends it
            self.outbox.wake()
        self._threads[0].join(max(0.1, deadline - time.monotonic()))
        missing = []
        if not delivered:
            with self._seal_lock:
                self.outbox.seal_queued()  # rows still queued count as undelivered too
            rows = len(self.pre) + sum(len(b.rows) for b in self.outbox.unacked)
            why = self.gave_up or ("the run was fenced" if self.fenced else f"server {self.server} unreachable")
            missing.append(f"{rows} metric rows and the final state were not delivered ({why})")
        self.outbox.unacked.forget(self.experiment_id, self.attempt)  # removes the spill file
        self.pre.drop()
        return missing

    def _confirmed(self, state: int, deadline: float) -> bool:
        """Poll Get until the server has the run in `state` (or `deadline`). A server that
        will not answer Get to this token (auth: the run token is not a client token)
        leaves the drained outbox as the best evidence there is."""
        channel = open_channel(self.server)
        try:
            stub = pb_grpc.ExperimentsStub(channel)
            while True:
                left = deadline - time.monotonic()
                if self._final_stored:
                    return True
                try:
                    x = stub.Get(pb.GetRequest(id=self.experiment_id), metadata=auth_metadata(self.token),
                                 timeout=max(0.5, left))
                    if x.state == state:
                        return True
                    if x.state not in (pb.ASSIGNED, pb.RUNNING):  # ended otherwise (lease expired...)
                        log.warning("trainctl: experiment %d ended %s, not %s", self.experiment_id,
                                    pb.ExperimentState.Name(x.state), pb.ExperimentState.Name(state))
                        return False
                except grpc.RpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        return True
                if left <= 0.01:
                    return False
                time.sleep(0.01)
        finally:
            channel.close()


class _Retry(Exception):
    pass
