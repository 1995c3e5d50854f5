"""The worker agent: keeps a stream to the server, runs what it is assigned.

Threads: the main thread runs one run at a time, each in its own process (see
runner.py: the loop must not share a GIL with the gRPC threads) and relays between
it and the outbox; a receiver thread reads the server's messages (assignments,
control, cancel, acks) and reconnects with backoff when the stream breaks; gRPC's own
thread drains the `Outbox` into the stream.
"""
from __future__ import annotations

import logging
import queue
import random
import signal
import socket
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Optional

import grpc

from trainctl.transport import auth_metadata, open_channel
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.wire import dict_from_struct, verb_of
from trainctl.workers.runner import ForwardingInbox, failure_reason, run_in_process, warm_up
from trainctl.workers.shipper import Outbox

log = logging.getLogger(__name__)


class _Run:
    def __init__(self, assignment: pb.Assignment, inbox):
        self.experiment_id = assignment.experiment_id
        self.attempt = assignment.attempt
        self.inbox = inbox
        self.step = 0


class Agent:
    def __init__(self, server: str, *, worker_id: Optional[str] = None, workdir: str = "runs",
                 max_runs: int = 0, token: Optional[str] = None):
        self.server = server
        self.token = token
        self.worker_id = worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.workdir = Path(workdir)
        self.max_runs = max_runs
        self.outbox = Outbox(spill_path=self.workdir / f"spill-{self.worker_id}.bin")
        self.assignments: "queue.Queue[pb.Assignment]" = queue.Queue()
        self.stopping = threading.Event()
        self.heartbeat_interval = 2.0
        self.current: Optional[_Run] = None
        self._lock = threading.Lock()
        # Asked of a fork of the forkserver (which imports torch once for every run):
        # the agent itself never imports torch.
        self._devices = [pb.Device(**d) for d in warm_up()]
        self.exit_code = 0

    # ------------------------------------------------------------------ connection
    def _hello(self) -> pb.WorkerMessage:
        hello = pb.Hello(worker_id=self.worker_id, hostname=socket.gethostname(), devices=self._devices,
                         version="0.1.0")
        run = self.current
        if run is not None:
            hello.current.CopyFrom(pb.Heartbeat(experiment_id=run.experiment_id, attempt=run.attempt, step=run.step))
        return pb.WorkerMessage(hello=hello)

    def _heartbeat(self) -> pb.Heartbeat:
        run = self.current
        if run is None:
            return pb.Heartbeat()
        return pb.Heartbeat(experiment_id=run.experiment_id, attempt=run.attempt, step=run.step)

    def _receive_forever(self) -> None:
        backoff = 0.2
        while not self.stopping.is_set():
            stream_stop = threading.Event()
            channel = open_channel(self.server, (("grpc.keepalive_time_ms", 10_000),))
            try:
                stub = pb_grpc.WorkersStub(channel)
                responses = stub.Connect(self.outbox.stream(self._hello(), self._heartbeat,
                                                            self.heartbeat_interval, stream_stop),
                                         metadata=auth_metadata(self.token))
                for msg in responses:
                    backoff = 0.2
                    self._on_message(msg)
                log.warning("server closed the stream")
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    # Retrying cannot fix a bad token: stop with the server's reason.
                    log.error("server refused this worker: %s: %s", exc.code().name, exc.details())
                    self.exit_code = 3
                    self.stop()
                    return
                if not self.stopping.is_set():
                    log.warning("stream to %s broke: %s; reconnecting in %.1f s", self.server,
                                exc.code().name if hasattr(exc, "code") else exc, backoff)
            finally:
                stream_stop.set()
                channel.close()
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 2.0) * (0.8 + 0.4 * random.random())

    def _on_message(self, msg: pb.ServerMessage) -> None:
        from trainctl.workers.engine.context import Command

        kind = msg.WhichOneof("msg")
        if kind == "welcome":
            self.heartbeat_interval = msg.welcome.heartbeat_interval_s or self.heartbeat_interval
        elif kind == "assignment":
            self.assignments.put(msg.assignment)
        elif kind == "batch_ack":
            a = msg.batch_ack
            self.outbox.acked(a.experiment_id, a.attempt, a.seq)
        elif kind in ("control", "cancel"):
            body = getattr(msg, kind)
            run = self.current
            if run is None or (run.experiment_id, run.attempt) != (body.experiment_id, body.attempt):
                if kind == "cancel":
                    self.outbox.forget(body.experiment_id, body.attempt)
                return
            if kind == "control":
                run.inbox.put(Command(body.command_id, verb_of(body.kind) or "?", body.value))
            else:
                if "fenced" in body.reason:
                    log.warning("experiment %d attempt %d fenced by the server; dropping it: %s",
                                body.experiment_id, body.attempt, body.reason)
                    self.outbox.forget(body.experiment_id, body.attempt)
                run.inbox.cancel(body.reason)

    # ------------------------------------------------------------------ running
    def run(self) -> int:
        receiver = threading.Thread(target=self._receive_forever, name="receiver", daemon=True)
        receiver.start()
        log.info("worker %s -> %s", self.worker_id, self.server)
        done = 0
        while not self.stopping.is_set():
            try:
                assignment = self.assignments.get(timeout=0.2)
            except queue.Empty:
                continue
            self._train(assignment)
            done += 1
            if self.max_runs and done >= self.max_runs:
                break
        self._drain(timeout=10)
        self.stopping.set()
        return self.exit_code

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.outbox.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        # The last message (a final state) left the outbox but may still sit in gRPC's
        # send buffer; give it a moment before the process exits.
        time.sleep(0.3)

    def _state(self, run: _Run, state: int, message: str = "", summary: Optional[dict] = None) -> None:
        self.outbox.send(pb.WorkerMessage(state=pb.StateUpdate(
            experiment_id=run.experiment_id, attempt=run.attempt, state=state, message=message,
            summary=summary or {})), sticky=True)

    def _train(self, a: pb.Assignment) -> None:
        from trainctl.spec import SpecError, parse_spec
        from trainctl.workers.engine.context import Ack, Cancelled, TrainingContext, TrainingError

        def send_ack(ack: Ack) -> None:
            self.outbox.send(pb.WorkerMessage(ack=pb.ControlAck(
                experiment_id=a.experiment_id, attempt=a.attempt, command_id=ack.command_id, ok=ack.ok,
                applied_step=ack.applied_step, old_value=ack.old_value, new_value=ack.new_value,
                message=ack.message)), sticky=True)

        inbox = ForwardingInbox(scheduled=_scheduled_commands(a), on_ack=send_ack)
        for cmd in _live_commands(a):
            inbox.put(cmd)
        run = _Run(a, inbox)
        self.current = run
        self._state(run, pb.RUNNING)
        log.info("experiment %d attempt %d: %s", a.experiment_id, a.attempt, a.name)

        def progress(step: int) -> None:
            run.step = step

        ctx = TrainingContext(inbox=inbox,
                              checkpoint_dir=str(self.workdir / f"exp-{a.experiment_id}"), on_progress=progress)
        def on_rows(rows: list[tuple]) -> None:  # batches from the run process (or DDP rank 0)
            self.outbox.add_rows(a.experiment_id, a.attempt, rows)

        try:
            spec = parse_spec(dict_from_struct(a.spec), check_model=False)
            if spec.resources.nproc > 1 or spec.resources.nnodes > 1:
                from trainctl.workers.ddp import run_ddp  # ranks via torch's elastic launcher

                summary = run_ddp(spec, ctx, on_rows=on_rows)  # rank 0 bridged to this ctx and on_rows
            else:
                summary = run_in_process(spec, ctx, on_rows)
            self._state(run, pb.COMPLETED, summary=summary.as_dict())
            log.info("experiment %d completed: val_top1 %.4f", a.experiment_id, summary.val_top1)
        except Cancelled as exc:
            if self.stopping.is_set():  # SIGTERM: hand the run back, it resumes elsewhere
                self._state(run, pb.QUEUED, message=f"worker {self.worker_id} stopped; handed back")
            else:
                self._state(run, pb.CANCELLED, message=str(exc))
        except (TrainingError, SpecError, ValueError, FileNotFoundError) as exc:
            log.warning("experiment %d failed: %s", a.experiment_id, exc)
            self._state(run, pb.FAILED, message=str(exc))
        except Exception as exc:  # a bug or a runtime error (OOM, ...): still a clean FAILED
            log.error("experiment %d crashed:\n%s", a.experiment_id, traceback.format_exc())
            self._state(run, pb.FAILED, message=failure_reason(exc))
        finally:
            self.current = None

    def stop(self) -> None:
        self.stopping.set()
        run = self.current
        if run is not None:
            run.inbox.cancel("worker stopping")


def _scheduled_commands(a: pb.Assignment):
    from trainctl.workers.engine.context import Command

    # Scheduled and replayed commands, plus live ones already applied in an earlier
    # attempt: each is re-applied at its step so a resumed run rebuilds the same state.
    out = []
    for c in a.controls:
        step = c.applied_step if c.status == pb.APPLIED else c.at_step
        if step >= 0:
            out.append(Command(c.command_id, verb_of(c.kind), c.value, at_step=step))
    return out


def _live_commands(a: pb.Assignment):
    from trainctl.workers.engine.context import Command

    return [Command(c.command_id, verb_of(c.kind), c.value)
            for c in a.controls if c.status == pb.PENDING and c.at_step < 0]


def run_worker(server: str, **kwargs) -> int:
    agent = Agent(server, **kwargs)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    return agent.run()
