"""The server a submitted command's SDK talks to: a gRPC server on a unix socket, run by
the worker agent for one attempt of one CODE experiment.

`trainctl.init()` inside the command finds it through the environment (`env()`:
TRAINCTL_SERVER=unix:..., TRAINCTL_TOKEN=a random token made for this attempt) and
speaks to it exactly as an attached run speaks to the real server: Experiments.Attach
(answered with this experiment and attempt, and the commands it must re-apply),
Workers.Connect (the run's stream), Experiments.Get, and Artifacts for run.save.

What the child sends is relayed over the agent's one stream (DESIGN.md: "one stream per
worker, the same fencing"): metric batches become rows on the agent's outbox
(`outbox.add_rows`) and are acknowledged to the child at once, since from there the
agent's outbox (memory, then disk, resent after reconnects) owns their delivery; acks,
knob declarations and RUNNING go up as they are. The child's final state is kept
(`final_state`), not forwarded: the command's exit status decides how the run ends
(workers/code_run.py). Control and cancel for this attempt come down from the agent
(`relay`, called by Agent._on_message).

Trust: the socket lives in a fresh 0700 directory; every call must carry the attempt's
token (anything else: UNAUTHENTICATED), and may speak only for this experiment and
attempt (anything else: PERMISSION_DENIED). Artifacts go upstream with the worker's own
credentials, so the child never holds a token the server knows. (The services
themselves, thin, are in workers/local_services.py.)
"""
from __future__ import annotations

import itertools
import logging
import math
import queue
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent import futures
from pathlib import Path
from typing import Optional

import grpc

from trainctl.artifact_io import WORKER_ID_METADATA
from trainctl.transport import auth_metadata, open_channel
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.workers.engine.checkpoint import checkpoint_dir
from trainctl.workers.local_services import Abort, Artifacts, Experiments, TokenCheck, Workers

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0        # the child's heartbeat period on its local stream
MAX_PENDING = 1000       # controls relayed to the child and not yet acknowledged
MAX_SESSIONS = 64        # SDK sessions whose batch seq is remembered
ROWS_FIRST_S = 5.0       # the longest a checkpoint upload waits for the rows before it
_FINAL = (pb.COMPLETED, pb.FAILED, pb.CANCELLED)
_DENIED = grpc.StatusCode.PERMISSION_DENIED


class LocalEndpoint:
    """One attempt's endpoint: `start()`, hand `env()` to the command, `stop()` after it
    exited; `final_state` is the StateUpdate the child's SDK sent last, if any."""

    def __init__(self, agent, assignment: pb.Assignment):
        self.agent = agent
        self.assignment = assignment
        self.experiment_id, self.attempt = assignment.experiment_id, assignment.attempt
        self.token = secrets.token_urlsafe(32)
        self.checkpoint_dir = checkpoint_dir(agent.workdir, assignment.store_id, assignment.experiment_id)
        self.final_state: Optional[pb.StateUpdate] = None
        self.state = pb.ASSIGNED      # as the child last reported it (Experiments.Get)
        self.step = 0                 # the highest step the child reported (the agent's heartbeats)
        self.fenced = False
        self._lock = threading.Lock()
        self._streams: list[queue.Queue] = []          # outgoing queues of the open Connect streams
        self._pending: "OrderedDict[str, pb.ServerMessage]" = OrderedDict()  # controls not acked yet
        self._cancel: Optional[pb.ServerMessage] = None
        # Per SDK session (the worker_id its Attach got): the highest batch seq taken. A
        # resend after a reconnect is acked again, not added twice; a second
        # `trainctl.init()` in the same command numbers its batches from 1 again.
        self._acked: "OrderedDict[str, int]" = OrderedDict()
        self._sessions = itertools.count(1)
        self._running_sent = False
        self._dir: Optional[Path] = None
        self._server: Optional[grpc.Server] = None
        self._upstream: Optional[grpc.Channel] = None
        self._stopped = False
        for c in assignment.controls:  # live commands still pending: sent down once the child connects
            if c.status == pb.PENDING and not (c.HasField("at_step") and c.at_step >= 0):
                self._pending[c.command_id] = pb.ServerMessage(control=pb.ControlCommand(
                    experiment_id=self.experiment_id, attempt=self.attempt, command_id=c.command_id,
                    kind=c.kind, value=c.value, hold=c.hold, knob=c.knob))

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        return f"unix:{self._dir}/s"

    def start(self) -> "LocalEndpoint":
        # A short path (unix socket paths are limited to ~107 bytes), private to this user.
        self._dir = Path(tempfile.mkdtemp(prefix="tc-", dir="/tmp"))
        self._dir.chmod(0o700)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="local-endpoint"),
                             interceptors=[TokenCheck(self.token)], maximum_concurrent_rpcs=32,
                             options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20),
                                      # the SDK's keepalive pings (every 10 s) are welcome, as on the server
                                      ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                                      ("grpc.keepalive_permit_without_calls", 1)])
        pb_grpc.add_ExperimentsServicer_to_server(Experiments(self), server)
        pb_grpc.add_WorkersServicer_to_server(Workers(self), server)
        pb_grpc.add_ArtifactsServicer_to_server(Artifacts(self), server)
        if server.add_insecure_port(self.address) == 0:
            raise OSError(f"could not listen on {self.address}")
        server.start()
        self._server = server
        self.agent.endpoint = self  # Agent._on_message relays this run's control/cancel here
        log.info("experiment %d attempt %d: SDK endpoint on %s", self.experiment_id, self.attempt, self.address)
        return self

    def env(self) -> dict[str, str]:
        """The environment that makes `trainctl.init()` in the command join this attempt."""
        a = self.assignment
        env = {"TRAINCTL_SERVER": self.address, "TRAINCTL_TOKEN": self.token, "TRAINCTL_TOKEN_FILE": "",
               "TRAINCTL_TLS_CA": "",  # the socket is plaintext, whatever the worker uses upstream
               "TRAINCTL_EXPERIMENT_ID": str(self.experiment_id), "TRAINCTL_ATTEMPT": str(self.attempt),
               "TRAINCTL_RUN_NAME": a.name, "TRAINCTL_CHECKPOINT_DIR": str(self.checkpoint_dir)}
        if a.HasField("checkpoint") and a.checkpoint.name:  # what run.load_checkpoint() resumes from
            env.update(TRAINCTL_CHECKPOINT_NAME=a.checkpoint.name, TRAINCTL_CHECKPOINT_SHA256=a.checkpoint.sha256,
                       TRAINCTL_CHECKPOINT_STEP=str(a.checkpoint.step))
        return env

    def stop(self, grace: float = 1.0) -> None:
        self._stopped = True
        if getattr(self.agent, "endpoint", None) is self:
            self.agent.endpoint = None
        with self._lock:
            for q in self._streams:
                q.put(None)
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1)
        if self._upstream is not None:
            self._upstream.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------------------ from the agent
    def relay(self, kind: str, body) -> bool:
        """A control or cancel from the server: to the child if it is this attempt's."""
        if (body.experiment_id, body.attempt) != (self.experiment_id, self.attempt) or self._stopped:
            return False
        msg = pb.ServerMessage(**{kind: body})
        with self._lock:
            if kind == "control":
                self._pending[body.command_id] = msg  # resent on a reconnect until acked
                while len(self._pending) > MAX_PENDING:
                    self._pending.popitem(last=False)
            else:
                self._cancel = msg
                self.fenced = self.fenced or body.kind == pb.STOP_FENCED
            for q in self._streams:
                q.put(msg)
        return True

    # ------------------------------------------------------------------ the child's stream
    def _mine(self, experiment_id: int, attempt: int) -> bool:
        return (experiment_id, attempt) == (self.experiment_id, self.attempt)

    def _not_mine(self, what: str, experiment_id: int, attempt: int) -> str:
        return (f"{what}: experiment {experiment_id} attempt {attempt}: this endpoint speaks only for "
                f"experiment {self.experiment_id} attempt {self.attempt}")

    def _open(self, out: queue.Queue) -> None:
        out.put(pb.ServerMessage(welcome=pb.Welcome(heartbeat_interval_s=HEARTBEAT_S,
                                                    lease_timeout_s=HEARTBEAT_S * 10)))
        with self._lock:
            for msg in self._pending.values():
                out.put(msg)
            if self._cancel is not None:
                out.put(self._cancel)
            self._streams.append(out)

    def _close(self, out: queue.Queue) -> None:
        with self._lock:
            if out in self._streams:
                self._streams.remove(out)

    def _read(self, requests, out: queue.Queue, session: str) -> None:
        try:
            for msg in requests:
                if self._stopped:
                    break
                why = self._take(msg, out, session)
                if why:
                    out.put(why)
                    return
        except Exception as exc:  # the child went away mid-stream (grpc raises on a cancelled call)
            log.debug("experiment %d: SDK stream ended: %s", self.experiment_id, exc)
        finally:
            out.put(None)

    def _take(self, msg: pb.WorkerMessage, out: queue.Queue, session: str) -> Optional["Abort"]:
        kind = msg.WhichOneof("msg")
        if kind in (None, "hello", "logs"):
            return None
        body = getattr(msg, kind)
        if kind == "heartbeat" and not body.experiment_id:
            return None
        if not self._mine(body.experiment_id, body.attempt):
            return Abort(_DENIED, self._not_mine(kind, body.experiment_id, body.attempt))
        if kind == "heartbeat":
            self._progress(body.step)
        elif self.fenced:
            return None  # the server gave this attempt away: nothing of it goes up
        elif kind == "metrics":
            return self._metrics(body, out, session)
        elif kind == "state":
            self._state(body)
            if body.state in _FINAL:  # kept here until the command exits: the SDK's finish() is done
                with self._lock:
                    seq = self._acked.get(session, 0)
                out.put(self._batch_ack(seq, final=True))
        elif kind == "ack":
            with self._lock:
                self._pending.pop(body.command_id, None)
            self.agent.outbox.send(msg, sticky=True)
        elif kind == "knobs":
            self.agent.outbox.send(msg)
        return None

    def _metrics(self, batch: pb.MetricBatch, out: queue.Queue, session: str) -> Optional["Abort"]:
        if batch.scope not in (pb.STEP, pb.EPOCH):
            return Abort(grpc.StatusCode.INVALID_ARGUMENT, f"metrics.scope: {batch.scope} is not STEP or EPOCH")
        names = list(batch.names)
        rows = []
        for r in batch.rows:
            if len(r.values) != len(names):
                return Abort(grpc.StatusCode.INVALID_ARGUMENT, f"metrics.rows: step {r.step} has "
                                                                f"{len(r.values)} values for {len(names)} names")
            rows.append((pb.Scope.Name(batch.scope), r.step, r.epoch, r.wall_time,
                         {n: v for n, v in zip(names, r.values) if not math.isnan(v)}))
        with self._lock:  # a batch resent after the child reconnected is acked, not added twice
            seq = self._acked.get(session, 0)
            fresh = batch.seq > seq
            if fresh:
                self.agent.outbox.add_rows(self.experiment_id, self.attempt, rows)
                seq = self._acked[session] = batch.seq
                self._acked.move_to_end(session)
                while len(self._acked) > MAX_SESSIONS:
                    self._acked.popitem(last=False)
        if fresh and rows:
            self._progress(max(r[1] for r in rows))
        out.put(self._batch_ack(seq))
        return None

    def _batch_ack(self, seq: int, final: bool = False) -> pb.ServerMessage:
        return pb.ServerMessage(batch_ack=pb.BatchAck(experiment_id=self.experiment_id, attempt=self.attempt, seq=seq,
                                                      final=final))

    def _state(self, st: pb.StateUpdate) -> None:
        if st.state in _FINAL:
            kept = pb.StateUpdate()
            kept.CopyFrom(st)
            self.final_state, self.state = kept, st.state
        elif st.state == pb.RUNNING and self.state not in _FINAL:
            self.state = pb.RUNNING
            if not self._running_sent:
                self._running_sent = True
                self.agent.outbox.send(pb.WorkerMessage(state=st), sticky=True)

    def _progress(self, step: int) -> None:
        self.step = max(self.step, step)
        run = self.agent.current  # the agent's heartbeat reports the current run's step
        if run is not None and self._mine(run.experiment_id, run.attempt) and step > run.step:
            run.step = step

    # ------------------------------------------------------------------ upstream (artifacts)
    def rows_first(self) -> None:
        """Before a checkpoint goes up, give the rows the child sent before it (acked here,
        queued on the agent's outbox) a moment to reach the server: a restart resumes only
        from a checkpoint whose steps the server holds. Bounded (ROWS_FIRST_S)."""
        deadline = time.monotonic() + ROWS_FIRST_S
        while self.agent.outbox.pending() and time.monotonic() < deadline and not self._stopped:
            time.sleep(0.02)

    def upstream(self):
        if self._upstream is None:
            self._upstream = open_channel(self.agent.server)
        md = (*(auth_metadata(self.agent.token) or ()), (WORKER_ID_METADATA, self.agent.worker_id))
        return pb_grpc.ArtifactsStub(self._upstream), md

    def attach_response(self) -> pb.AttachResponse:
        recs = []
        for c in self.assignment.controls:
            # Applied in an earlier attempt: again at the step it was applied; scheduled or
            # replayed: at its step. The SDK applies a record once its step has come.
            if c.status == pb.APPLIED or (c.HasField("at_step") and c.at_step >= 0):
                r = pb.ControlRecord()
                r.CopyFrom(c)
                if c.status == pb.APPLIED:
                    r.at_step = c.applied_step
                recs.append(r)
        return pb.AttachResponse(experiment=self.experiment(), attempt=self.attempt,
                                 worker_id=f"code-{self.experiment_id}-a{self.attempt}-{next(self._sessions)}",
                                 run_token=self.token,
                                 heartbeat_interval_s=HEARTBEAT_S, lease_timeout_s=HEARTBEAT_S * 10, controls=recs)

    def experiment(self) -> pb.Experiment:
        a = self.assignment
        return pb.Experiment(id=self.experiment_id, name=a.name, state=self.state, spec=a.spec, attempt=self.attempt,
                             worker_id=self.agent.worker_id, kind=pb.CODE, code_sha256=a.code_sha256)
