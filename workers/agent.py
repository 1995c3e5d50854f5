"""The worker agent: keeps a stream to the server, runs what it is assigned.

Threads: the main thread runs one run at a time, each in its own process (see
runner.py: the loop must not share a GIL with the gRPC threads) and relays between
it and the outbox; a receiver thread reads the server's messages (assignments,
control, cancel, acks) and reconnects with backoff when the stream breaks; gRPC's own
thread drains the `Outbox` into the stream.

Start-up connects first: the stream opens (so a refused token ends the worker in about
a second) while the forkserver imports torch; the hello, which lists the devices, goes
out once they are known.

Checkpoints live in `<workdir>/<store_id>/exp-<id>/` (engine/checkpoint.py): one
namespace per store and experiment, so a fresh database reusing id 1 never resumes
another experiment 1. A fenced attempt (CancelRun.kind STOP_FENCED) is killed at once,
its unsent data dropped and its checkpoints removed: it may have trained past what
the store holds.
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
from trainctl.controls import verb_of
from trainctl.wire import dict_from_struct
from trainctl.workers.dataroots import check_spec, resolve_roots
from trainctl.workers.checkpoint_sync import CheckpointSync
from trainctl.workers.engine.checkpoint import checkpoint_dir, drop_stale_temps, forget_attempt, prune
from trainctl.workers.logship import LogShipper
from trainctl.workers.run_process import failure_reason
from trainctl.workers.runner import ForwardingInbox, run_in_process, warm_up
from trainctl.workers.usage import UsageSampler
from trainctl.outbox import Outbox

log = logging.getLogger(__name__)
# How long a run's end waits for its checkpoint uploads (the lease allows them until the
# final state is sent): completed, and handed back (a SIGTERM'd worker must exit soon).
UPLOAD_DRAIN_S, HANDBACK_DRAIN_S = 30.0, 5.0


class _Run:
    def __init__(self, assignment: pb.Assignment, inbox):
        self.experiment_id = assignment.experiment_id
        self.attempt = assignment.attempt
        self.inbox = inbox
        self.step = 0
        self.started = False  # RUNNING sent (once the run process has built and resumed)
        self.notes: list[str] = []  # shown as the RUNNING state's message


class Agent:
    def __init__(self, server: str, *, worker_id: Optional[str] = None, workdir: str = "runs",
                 max_runs: int = 0, token: Optional[str] = None, data_roots: Optional[list[str]] = None,
                 accepts_code: bool = True):
        self.server = server
        self.token = token
        self.worker_id = worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.workdir = Path(workdir)
        self.max_runs = max_runs
        self.data_roots = resolve_roots(data_roots)
        self.accepts_code = accepts_code  # runs submitted commands (CODE experiments); --no-code: spec runs only
        self.outbox = Outbox(spill_path=self.workdir / f"spill-{self.worker_id}.bin")
        self.logs = LogShipper(self.outbox)  # runs' output lines (workers/logship.py)
        self.checkpoints = CheckpointSync(server, token, worker_id=self.worker_id)  # spec runs' checkpoints
        self.assignments: "queue.Queue[pb.Assignment]" = queue.Queue()
        self.stopping = threading.Event()
        self.heartbeat_interval = 2.0
        self.current: Optional[_Run] = None
        self.endpoint = None  # a code run's LocalEndpoint (workers/local_endpoint.py) while it runs
        self._lock = threading.Lock()
        # Asked of a fork of the forkserver (which imports torch once for every run):
        # the agent itself never imports torch. Filled by `_warm_up` while the stream opens.
        self._devices: list[pb.Device] = []
        self._ready = threading.Event()
        self._warm_error: Optional[BaseException] = None
        self._connected_once = False
        self._usage: Optional[UsageSampler] = None  # made by the first heartbeat
        self.exit_code = 0

    def _warm_up(self) -> None:
        try:
            self._devices = [pb.Device(**d) for d in warm_up()]
            log.info("worker %s ready: torch loaded, devices %s", self.worker_id,
                     ", ".join(f"{d.kind}:{d.index} {d.name}" for d in self._devices))
        except BaseException as exc:  # reported by run()
            self._warm_error = exc
        finally:
            self._ready.set()

    # ------------------------------------------------------------------ connection
    def _hello(self) -> pb.WorkerMessage:
        while not self._ready.wait(0.1):  # the call is open meanwhile: a bad token shows now
            if self.stopping.is_set():
                break
        hello = pb.Hello(worker_id=self.worker_id, hostname=socket.gethostname(), devices=self._devices,
                         version="0.1.0", accepts_code=self.accepts_code)
        run = self.current
        if run is not None:
            hello.current.CopyFrom(pb.Heartbeat(experiment_id=run.experiment_id, attempt=run.attempt, step=run.step))
        return pb.WorkerMessage(hello=hello)

    def _heartbeat(self) -> pb.Heartbeat:
        run = self.current
        hb = pb.Heartbeat() if run is None else pb.Heartbeat(experiment_id=run.experiment_id, attempt=run.attempt,
                                                             step=run.step)
        # Usage rides on the heartbeat that falls due (every ~5 s), not on each one. The
        # sampler's CPU baseline is the first heartbeat.
        if self._usage is None:
            self._usage = UsageSampler()
        hb.usage.extend(self._usage.due())
        return hb

    def _receive_forever(self) -> None:
        backoff = 0.2
        while not self.stopping.is_set():
            stream_stop = threading.Event()
            channel = open_channel(self.server, (("grpc.keepalive_time_ms", 10_000),))
            try:
                stub = pb_grpc.WorkersStub(channel)
                # logs.stream: unacknowledged log lines go again right after the hello.
                responses = stub.Connect(self.logs.stream(self.outbox.stream(self._hello, self._heartbeat,
                                                                             self.heartbeat_interval, stream_stop)),
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
            log.info("worker %s %s to %s (lease %.1f s)", self.worker_id,
                     "reconnected" if self._connected_once else "connected", self.server,
                     msg.welcome.lease_timeout_s)
            self._connected_once = True
        elif kind == "assignment":
            self.assignments.put(msg.assignment)
        elif kind == "batch_ack":
            a = msg.batch_ack
            self.outbox.acked(a.experiment_id, a.attempt, a.seq)
        elif kind == "log_ack":
            self.logs.acked(msg.log_ack.experiment_id, msg.log_ack.attempt, msg.log_ack.index)
        elif kind in ("control", "cancel"):
            body = getattr(msg, kind)
            run = self.current
            fenced = kind == "cancel" and body.kind == pb.STOP_FENCED
            if fenced:  # first, so nothing more of it leaves, whichever run it is
                self.outbox.forget(body.experiment_id, body.attempt)
                self.logs.forget(body.experiment_id, body.attempt)
            endpoint = self.endpoint  # a code run: its SDK applies commands and sees cancels
            if endpoint is not None and endpoint.relay(kind, body) and kind == "control":
                return
            if run is None or (run.experiment_id, run.attempt) != (body.experiment_id, body.attempt):
                return
            if kind == "control":
                run.inbox.put(Command(body.command_id, verb_of(body.kind) or "?", body.value, hold=body.hold))
            elif fenced:
                log.warning("experiment %d attempt %d fenced by the server: stopping it now (%s)",
                            body.experiment_id, body.attempt, body.reason)
                run.inbox.fence(body.reason)
            else:
                run.inbox.cancel(body.reason)

    # ------------------------------------------------------------------ running
    def run(self) -> int:
        receiver = threading.Thread(target=self._receive_forever, name="receiver", daemon=True)
        receiver.start()
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
        log.info("worker %s starting: server %s, workdir %s, data roots %s", self.worker_id, self.server,
                 self.workdir, ", ".join(self.data_roots))
        while not self._ready.wait(0.1):
            if self.stopping.is_set():  # refused by the server: no need to wait for torch
                return self.exit_code
        if self._warm_error is not None:
            self.stopping.set()
            raise self._warm_error
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
        self.logs.flush(run.experiment_id, run.attempt)  # its last lines before its state
        self.outbox.send(pb.WorkerMessage(state=pb.StateUpdate(
            experiment_id=run.experiment_id, attempt=run.attempt, state=state, message=message,
            summary=summary or {})), sticky=True)

    def _train(self, a: pb.Assignment) -> None:
        from trainctl.spec import SpecError, parse_spec
        from trainctl.workers.engine.context import Ack, Cancelled, Lineage, TrainingContext, TrainingError
        from trainctl.workers.code_run import is_code, run_code

        if is_code(a):  # a submitted command, not the built-in trainer (workers/code_run.py)
            return run_code(self, a)

        def send_ack(ack: Ack) -> None:
            self.outbox.send(pb.WorkerMessage(ack=pb.ControlAck(
                experiment_id=a.experiment_id, attempt=a.attempt, command_id=ack.command_id, ok=ack.ok,
                applied_step=ack.applied_step, old_value=ack.old_value, new_value=ack.new_value,
                message=ack.message, consequence=ack.consequence)), sticky=True)

        inbox = ForwardingInbox(scheduled=_scheduled_commands(a), on_ack=send_ack)
        for cmd in _live_commands(a):
            inbox.put(cmd)
        run = _Run(a, inbox)
        self.current = run
        ids = f"experiment {a.experiment_id} attempt {a.attempt}"
        ckdir = checkpoint_dir(self.workdir, a.store_id, a.experiment_id)
        log.info("%s started: %r (checkpoints in %s; the server holds %d steps, %d epochs)", ids, a.name, ckdir,
                 a.delivered_steps, a.delivered_epochs)

        def progress(step: int) -> None:
            run.step = step
            if not run.started:  # the first progress comes once the run is built and resumed
                run.started = True
                self._state(run, pb.RUNNING, message="; ".join(run.notes))

        def note(text: str) -> None:  # resumed from / a corrupt checkpoint set aside
            log.info("%s: %s", ids, text)
            run.notes.append(text)

        self.checkpoints.fetch(a, ckdir, note)  # the store's newest checkpoint, when this box lacks it
        lineage = Lineage(store_id=a.store_id, experiment_id=a.experiment_id, attempt=a.attempt,
                          delivered_steps=a.delivered_steps, delivered_epochs=a.delivered_epochs)
        ctx = TrainingContext(inbox=inbox, checkpoint_dir=str(ckdir), lineage=lineage, on_progress=progress,
                              on_note=note, on_checkpoint=lambda path, step: self.checkpoints.upload(
                                  a.experiment_id, a.attempt, path, step),
                              # the run process's logging (trainctl.* loggers, INFO+) as LOGGING lines
                              on_log=lambda text: self.logs.add(a.experiment_id, a.attempt, pb.LOGGING, text))

        def on_rows(rows: list[tuple]) -> None:  # batches from the run process (or DDP rank 0)
            self.outbox.add_rows(a.experiment_id, a.attempt, rows)

        try:
            spec = parse_spec(dict_from_struct(a.spec), check_model=False)
            check_spec(spec, self.data_roots)  # before anything opens a file the spec names
            if spec.resources.nproc > 1 or spec.resources.nnodes > 1:
                from trainctl.workers.ddp import run_ddp  # ranks via torch's elastic launcher

                summary = run_ddp(spec, ctx, on_rows=on_rows)  # rank 0 bridged to this ctx and on_rows
            else:
                summary = run_in_process(spec, ctx, on_rows)
            if inbox.fenced:
                raise Cancelled(inbox.cancel_reason)
            self.checkpoints.drain(UPLOAD_DRAIN_S)  # while the lease still lets them in
            self._state(run, pb.COMPLETED, summary=summary.as_dict())
            drop_stale_temps(ckdir)
            prune(ckdir, spec.train.keep_checkpoints)  # train.keep_checkpoints: 0 = none kept
            log.info("%s completed: %d steps, val_top1 %.4f", ids, summary.steps, summary.val_top1)
        except Cancelled as exc:
            if inbox.fenced:  # its process is gone; what it wrote may be past what the store holds
                gone = forget_attempt(ckdir, a.attempt)
                log.warning("%s fenced: stopped, unsent metrics dropped, %d checkpoint(s) removed", ids, len(gone))
            elif self.stopping.is_set():  # SIGTERM: hand the run back, it resumes elsewhere
                self.checkpoints.drain(HANDBACK_DRAIN_S)
                self._state(run, pb.QUEUED, message=f"worker {self.worker_id} stopped; handed back")
                log.info("%s handed back: worker stopping", ids)
            else:
                self._state(run, pb.CANCELLED, message=str(exc))
                log.info("%s cancelled: %s", ids, exc)
        except (TrainingError, SpecError, ValueError, FileNotFoundError) as exc:
            log.warning("%s failed: %s", ids, exc)
            self._state(run, pb.FAILED, message=str(exc))
        except Exception as exc:  # a bug or a runtime error (OOM, ...): still a clean FAILED
            log.error("%s crashed:\n%s", ids, traceback.format_exc())
            self._state(run, pb.FAILED, message=failure_reason(exc))
        finally:
            self.checkpoints.forget(a.experiment_id, a.attempt)  # ended: the server would refuse the rest
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
        if c.status == pb.APPLIED:
            step = c.applied_step
        else:
            step = c.at_step if c.HasField("at_step") else -1
        if step >= 0:
            out.append(Command(c.command_id, verb_of(c.kind), c.value, at_step=step, hold=c.hold))
    return out


def _live_commands(a: pb.Assignment):
    from trainctl.workers.engine.context import Command

    return [Command(c.command_id, verb_of(c.kind), c.value, hold=c.hold)
            for c in a.controls if c.status == pb.PENDING and not (c.HasField("at_step") and c.at_step >= 0)]


def run_worker(server: str, **kwargs) -> int:
    agent = Agent(server, **kwargs)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    return agent.run()
