"""The Workers service: one bidirectional stream per worker process.

Trust: a worker's token opens the stream, but a message about a run (metrics, logs,
state, ack, heartbeat, hand-back) is taken only from the session that holds that run's lease
(`Dispatcher.holds`: same worker id, same attempt, the worker's registered stream).
Anything else is refused with a typed stop, CancelRun(kind=STOP_FENCED): the stream
stays open, because a worker legitimately fenced (lease lost while it was frozen) must
drop that run but keep serving; a forger learns nothing it did not send. Each refused
run is logged once per session and answered once, so a flood costs neither log nor
memory. The store's own fencing by (experiment, attempt) stays behind this check.

Store outages: a worker's message is applied in stream order; a write that meets
StoreUnavailable is retried in place until it succeeds (lease time is paused meanwhile,
see leases.py), so a cumulative batch ack never covers a batch that was not stored.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Optional

import grpc

from trainctl.server import attach, convert
from trainctl.server.dispatcher import Dispatcher, WorkerSession
from trainctl.server.guard import rate_limited
from trainctl.server.live import Live
from trainctl.server.store import entities as e
from trainctl.server.store.errors import InvalidTransition, NotFound, StaleAttempt, StoreError, StoreUnavailable
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_USAGE_KINDS = frozenset({"cpu", "cuda", "mps"})
_MAX_USAGE = 17  # the host's CPU plus up to 16 devices

_WORKER_STATES = {pb.RUNNING: e.RUNNING, pb.COMPLETED: e.COMPLETED, pb.FAILED: e.FAILED, pb.CANCELLED: e.CANCELLED}
MAX_REFUSED = 1024  # refused runs remembered per session (beyond: refused silently)
RETRY_S = (0.1, 0.2, 0.5, 1.0, 2.0)  # backoff of a write retried through a store outage


class WorkersService(pb_grpc.WorkersServicer):
    def __init__(self, live: Live, dispatcher: Dispatcher, *, heartbeat_interval: float):
        self.live = live
        self.store = live.store
        self.db = live.db
        self.dispatcher = dispatcher
        self.heartbeat_interval = heartbeat_interval
        dispatcher.heartbeat_interval = heartbeat_interval  # what Attach tells an SDK

    async def Connect(self, request_iterator, context: grpc.aio.ServicerContext):
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("msg") != "hello" or not first.hello.worker_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hello: the first message must be a hello with worker_id")
        hello = first.hello
        if self.dispatcher.live_session(hello.worker_id, quiet_after=2.5 * self.heartbeat_interval):
            # Another live process already speaks for this id: refuse rather than let a
            # second Connect hijack (or double-run) that worker's assignments.
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"hello.worker_id: worker {hello.worker_id!r} is already connected")
        try:  # an attached run's SDK proves its run token (server/attach.py)
            refusal = await attach.verify_session(self.db, self.store, hello)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if refusal:
            log.warning("refused Connect as %r: %s", hello.worker_id[:80], refusal)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        session = WorkerSession(worker_id=hello.worker_id, hostname=hello.hostname,
                                gpus=sum(1 for d in hello.devices if d.kind == "cuda"),
                                attached=bool(hello.run_token), accepts_code=hello.accepts_code)
        try:
            await self.db(self.store.upsert_worker, hello.worker_id, hello.hostname,
                          [{"kind": d.kind, "index": d.index, "name": d.name, "memory_bytes": d.memory_bytes}
                           for d in hello.devices])
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if hello.current.experiment_id:
            cur = hello.current
            if self.dispatcher.adopt(session, cur.experiment_id, cur.attempt):
                if session.attached:  # commands its previous stream may not have got
                    for msg in attach.pending_commands(cur.experiment_id, cur.attempt,
                                                       await self.db(self.store.list_controls, cur.experiment_id)):
                        session.send(msg)
            else:
                log.info("worker %s reconnected with experiment %d attempt %d, whose lease it no longer holds: "
                         "told to drop it", hello.worker_id, cur.experiment_id, cur.attempt)
                session.send(convert.stop_message(cur.experiment_id, cur.attempt, pb.STOP_FENCED,
                                                  "attempt fenced: its lease was lost; drop the run"))
        session.send(pb.ServerMessage(welcome=pb.Welcome(heartbeat_interval_s=self.heartbeat_interval,
                                                         lease_timeout_s=self.dispatcher.lease_timeout)))
        self.dispatcher.register(session)
        log.info("worker %s joined (%s, %d GPU)", hello.worker_id, hello.hostname, session.gpus)
        reader = asyncio.create_task(self._read(request_iterator, session))
        try:
            while True:
                msg = await session.outbox.get()
                if msg is None:
                    break
                yield msg
        finally:
            reader.cancel()
            self.dispatcher.unregister(session)
            try:
                await self.db(self.store.mark_worker, hello.worker_id, False)
            except StoreError as exc:  # the next hello marks it again
                log.info("worker %s: could not record the disconnect: %s", hello.worker_id, exc)
            log.info("worker %s left", hello.worker_id)

    async def _read(self, request_iterator, session: WorkerSession) -> None:
        # A metric batch is written while the stream reads on (at most one at a time, so
        # at most one more is held in memory): a control ack or a heartbeat read meanwhile
        # is handled at once instead of after a second-long batch's write (that wait was
        # the tail of set-lr's latency). Anything else waits for the batch first, so
        # states, knobs and logs keep their stream order relative to metrics.
        writing: Optional[asyncio.Task] = None
        try:
            async for msg in request_iterator:
                session.suspect = False
                session.last_seen = time.monotonic()
                kind = msg.WhichOneof("msg")
                if kind == "heartbeat":
                    self._on_heartbeat(session, msg.heartbeat)
                    continue
                if kind == "ack":
                    await self._on_ack(session, msg.ack)
                    continue
                if writing is not None:
                    await writing
                    writing = None
                if kind == "metrics":
                    writing = asyncio.create_task(self._on_metrics(session, msg.metrics))
                    # Its error is raised by the next await of it; if the stream is cancelled
                    # first, asyncio would log it as never retrieved.
                    writing.add_done_callback(lambda t: t.cancelled() or t.exception())
                elif kind == "state":
                    await self._on_state(session, msg.state)
                elif kind == "knobs":
                    await self._on_knobs(session, msg.knobs)
                elif kind == "logs":
                    await self._on_logs(session, msg.logs)
            if writing is not None:  # the stream ended: its last batch is still stored and acked
                await writing
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker %s stream failed", session.worker_id)
        finally:
            session.close()

    # ------------------------------------------------------------------ trust
    def _take(self, session: WorkerSession, experiment_id: int, attempt: int, what: str) -> bool:
        """Whether to act on `what` about run (experiment_id, attempt) from `session`.
        Renews the lease on receipt, before any store work; refuses otherwise."""
        if self.dispatcher.renew(session, experiment_id, attempt):
            return True
        self._refuse(session, experiment_id, attempt, f"{what} from a session that does not hold its lease")
        return False

    def _refuse(self, session: WorkerSession, experiment_id: int, attempt: int, why: str) -> None:
        if session.current == (experiment_id, attempt):
            session.current = None
        key = (experiment_id, attempt)
        if key in session.refused or len(session.refused) >= MAX_REFUSED:
            return
        session.refused.add(key)
        routine = self.dispatcher.ended.get(experiment_id) == (session.worker_id, attempt)  # its own run ended
        log.log(logging.INFO if routine else logging.WARNING,
                "worker %s: refused messages about experiment %d attempt %d: %s", session.worker_id,
                experiment_id, attempt, "the run has ended" if routine else why)
        session.send(convert.stop_message(experiment_id, attempt, pb.STOP_FENCED, f"attempt fenced: {why}"))

    async def _write(self, session: WorkerSession, fn, *args, **kwargs):
        """A store write for a worker message, retried in place through an outage (the
        stream waits; lease time is paused while it does)."""
        tries = 0
        with self.live.health.call():
            while True:
                try:
                    return await self.db(fn, *args, **kwargs)
                except StoreUnavailable as exc:
                    if tries == 0:
                        log.warning("worker %s: store unavailable, retrying %s: %s", session.worker_id,
                                    fn.__name__, exc)
                    await asyncio.sleep(RETRY_S[min(tries, len(RETRY_S) - 1)])
                    tries += 1

    # ------------------------------------------------------------------ messages
    def _on_heartbeat(self, session: WorkerSession, hb: pb.Heartbeat) -> None:
        if hb.usage:
            # Bounded and typed: these become Prometheus label values.
            session.usage = [u for u in hb.usage if u.kind in _USAGE_KINDS and 0 <= u.index < 64][:_MAX_USAGE]
        if hb.experiment_id:
            self._take(session, hb.experiment_id, hb.attempt, "heartbeat")

    async def _on_metrics(self, session: WorkerSession, batch: pb.MetricBatch) -> None:
        if not self._take(session, batch.experiment_id, batch.attempt, "metrics"):
            return
        rows = [(r.step, r.epoch, r.wall_time, r.values) for r in batch.rows]
        try:
            points = await self._write(session, self.store.add_metrics, batch.experiment_id, batch.attempt,
                                       pb.Scope.Name(batch.scope), list(batch.names), rows)
        except (StaleAttempt, NotFound) as exc:
            self._refuse(session, batch.experiment_id, batch.attempt, str(exc))
            return
        self.live.stats.ingested(points)
        session.ack_later(batch.experiment_id, batch.attempt, batch.seq)
        self.live.publish(batch.experiment_id, pb.WatchEvent(metrics=batch))

    async def _on_state(self, session: WorkerSession, st: pb.StateUpdate) -> None:
        if st.state == pb.QUEUED:
            await self._on_hand_back(session, st)
            return
        state = _WORKER_STATES.get(st.state)
        if state is None or not self._take(session, st.experiment_id, st.attempt, "state"):
            return
        try:
            x = await self._write(session, self.store.transition, st.experiment_id, st.attempt, state,
                                  message=st.message, summary=dict(st.summary) or None)
        except (StaleAttempt, NotFound) as exc:
            self._refuse(session, st.experiment_id, st.attempt, str(exc))
            return
        except InvalidTransition as exc:
            # e.g. the client cancelled while the worker finished: the store keeps the first.
            log.info("worker %s: %s", session.worker_id, exc)
            x = await self.db(self.store.get_experiment, st.experiment_id)
            if x.is_final:
                self.dispatcher.release(st.experiment_id, st.attempt)
            self.live.experiment_changed(x)
            return
        log.info("experiment %d attempt %d is %s (worker %s)%s", x.id, st.attempt, x.state, session.worker_id,
                 f": {x.message}" if x.message else "")
        if x.is_final:
            self.dispatcher.release(st.experiment_id, st.attempt)
            session.ack_final(st.experiment_id, st.attempt)
        await self.live.run_changed(x)

    async def _on_hand_back(self, session: WorkerSession, st: pb.StateUpdate) -> None:
        """A stopping worker gives its run back: requeue without counting a restart."""
        session.draining = True
        if not self._take(session, st.experiment_id, st.attempt, "hand-back"):
            return
        try:
            x = await self._write(session, self.store.requeue, st.experiment_id, st.attempt, st.message,
                                  count_restart=False)
        except (StaleAttempt, NotFound, InvalidTransition) as exc:
            log.info("worker %s: hand-back refused: %s", session.worker_id, exc)
            return
        log.info("experiment %d attempt %d handed back by worker %s: requeued", x.id, st.attempt, session.worker_id)
        self.dispatcher.release(st.experiment_id, st.attempt)
        self.live.experiment_changed(x)

    async def _on_ack(self, session: WorkerSession, ack: pb.ControlAck) -> None:
        if not self._take(session, ack.experiment_id, ack.attempt, "control ack"):
            return
        status = e.APPLIED if ack.ok else e.REJECTED
        try:
            rec = await self._write(session, self.store.resolve_control, ack.experiment_id, ack.command_id,
                                    status=status, applied_step=ack.applied_step,
                                    old_value=None if math.isnan(ack.old_value) else ack.old_value,
                                    new_value=None if math.isnan(ack.new_value) else ack.new_value,
                                    message=ack.message, consequence=ack.consequence)
        except NotFound:
            log.warning("worker %s acked command %r, which experiment %d does not have", session.worker_id,
                        ack.command_id[:64], ack.experiment_id)
            return
        if rec.kind == e.SET_KNOB and rec.status == e.APPLIED and rec.new_value is not None:
            try:  # the knob's value is what the run says it applied
                await self._write(session, self.store.set_knob_value, rec.experiment_id, rec.knob, rec.new_value)
            except NotFound:
                log.info("worker %s applied unknown knob %r of experiment %d", session.worker_id, rec.knob[:64],
                         rec.experiment_id)
        log.info("control %s of experiment %d %s%s", rec.command_id, rec.experiment_id, rec.status,
                 f" at step {rec.applied_step}" if rec.status == e.APPLIED else f": {rec.message}")
        self.live.control_resolved(rec)

    async def _on_knobs(self, session: WorkerSession, decl: pb.KnobDeclaration) -> None:
        """The run declares its knobs: stored with their bounds, listed by Get."""
        if not self._take(session, decl.experiment_id, decl.attempt, "knob declaration"):
            return
        try:
            await self._write(session, self.store.declare_knobs, decl.experiment_id, decl.attempt,
                              [convert.knob_from_pb(k) for k in decl.knobs])
        except (StaleAttempt, NotFound) as exc:
            self._refuse(session, decl.experiment_id, decl.attempt, str(exc))
        except ValueError as exc:  # a bad name or bounds: logged (rate-limited), nothing stored
            rate_limited(logging.WARNING, ("knobs", decl.experiment_id), "worker %s: knob declaration of "
                         "experiment %d refused: %s", session.worker_id, decl.experiment_id, str(exc)[:300])

    async def _on_logs(self, session: WorkerSession, batch: pb.LogBatch) -> None:
        """Lines of the run's output (fenced like metrics): each stored once (a resend
        is ignored), acknowledged up to the batch's last index, the new ones published
        to `logs -f` followers (server/logs_rpc.py)."""
        if not batch.lines or not self._take(session, batch.experiment_id, batch.attempt, "logs"):
            return
        lines = [e.LogLine(batch.attempt, ln.index, ln.stream, ln.wall_time, ln.text) for ln in batch.lines]
        try:
            new = await self._write(session, self.store.add_logs, batch.experiment_id, batch.attempt, lines)
        except (StaleAttempt, NotFound) as exc:
            self._refuse(session, batch.experiment_id, batch.attempt, str(exc))
            return
        session.send(pb.ServerMessage(log_ack=pb.LogAck(experiment_id=batch.experiment_id, attempt=batch.attempt,
                                                        index=max(ln.index for ln in batch.lines))))
        if new:
            self.live.log_hub.publish(batch.experiment_id, pb.LogBatch(
                experiment_id=batch.experiment_id, attempt=batch.attempt,
                lines=[pb.LogLine(attempt=ln.attempt, index=ln.index, stream=ln.stream, wall_time=ln.wall_time,
                                  text=ln.text) for ln in new]))
