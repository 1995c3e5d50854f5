"""The Workers service: one bidirectional stream per worker process."""
from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc

from trainctl.server.dispatcher import Dispatcher, WorkerSession
from trainctl.server.live import Live
from trainctl.server.store import entities as e
from trainctl.server.store.errors import InvalidTransition, NotFound, StaleAttempt
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_WORKER_STATES = {pb.RUNNING: e.RUNNING, pb.COMPLETED: e.COMPLETED, pb.FAILED: e.FAILED, pb.CANCELLED: e.CANCELLED}


class WorkersService(pb_grpc.WorkersServicer):
    def __init__(self, live: Live, dispatcher: Dispatcher, *, heartbeat_interval: float):
        self.live = live
        self.store = live.store
        self.db = live.db
        self.dispatcher = dispatcher
        self.heartbeat_interval = heartbeat_interval

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
        session = WorkerSession(worker_id=hello.worker_id, hostname=hello.hostname,
                                gpus=sum(1 for d in hello.devices if d.kind == "cuda"))
        await self.db(self.store.upsert_worker, hello.worker_id, hello.hostname,
                      [{"kind": d.kind, "index": d.index, "name": d.name, "memory_bytes": d.memory_bytes}
                       for d in hello.devices])
        if hello.current.experiment_id:
            cur = hello.current
            if not self.dispatcher.adopt(session, cur.experiment_id, cur.attempt):
                session.send(pb.ServerMessage(cancel=pb.CancelRun(
                    experiment_id=cur.experiment_id, attempt=cur.attempt, reason="attempt fenced; drop the run")))
        session.send(pb.ServerMessage(welcome=pb.Welcome(heartbeat_interval_s=self.heartbeat_interval,
                                                         lease_timeout_s=self.dispatcher.lease_timeout)))
        self.dispatcher.register(session)
        log.info("worker %s connected (%s, %d GPU)", hello.worker_id, hello.hostname, session.gpus)
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
            await self.db(self.store.mark_worker, hello.worker_id, False)
            log.info("worker %s disconnected", hello.worker_id)

    async def _read(self, request_iterator, session: WorkerSession) -> None:
        try:
            async for msg in request_iterator:
                session.suspect = False
                session.last_seen = time.monotonic()
                kind = msg.WhichOneof("msg")
                if kind == "heartbeat":
                    if msg.heartbeat.experiment_id:
                        self.dispatcher.renew(msg.heartbeat.experiment_id, msg.heartbeat.attempt)
                elif kind == "metrics":
                    await self._on_metrics(session, msg.metrics)
                elif kind == "state":
                    await self._on_state(session, msg.state)
                elif kind == "ack":
                    await self._on_ack(session, msg.ack)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker %s stream failed", session.worker_id)
        finally:
            session.close()

    def _fence(self, session: WorkerSession, experiment_id: int, attempt: int, why: str) -> None:
        log.warning("worker %s: refused a message for experiment %d attempt %d (fenced): %s",
                 session.worker_id, experiment_id, attempt, why)
        if session.current == (experiment_id, attempt):
            session.current = None
        session.send(pb.ServerMessage(cancel=pb.CancelRun(experiment_id=experiment_id, attempt=attempt,
                                                          reason=f"attempt fenced: {why}")))

    async def _on_metrics(self, session: WorkerSession, batch: pb.MetricBatch) -> None:
        rows = [(r.step, r.epoch, r.wall_time, r.values) for r in batch.rows]
        try:
            points = await self.db(self.store.add_metrics, batch.experiment_id, batch.attempt,
                                   pb.Scope.Name(batch.scope), list(batch.names), rows)
        except (StaleAttempt, NotFound) as exc:
            self._fence(session, batch.experiment_id, batch.attempt, str(exc))
            return
        self.live.stats.ingested(points)
        self.dispatcher.renew(batch.experiment_id, batch.attempt)
        session.ack_later(batch.experiment_id, batch.attempt, batch.seq)
        self.live.publish(batch.experiment_id, pb.WatchEvent(metrics=batch))

    async def _on_state(self, session: WorkerSession, st: pb.StateUpdate) -> None:
        if st.state == pb.QUEUED:
            await self._on_hand_back(session, st)
            return
        state = _WORKER_STATES.get(st.state)
        if state is None:
            return
        try:
            x = await self.db(self.store.transition, st.experiment_id, st.attempt, state,
                              message=st.message, summary=dict(st.summary) or None)
        except (StaleAttempt, NotFound) as exc:
            self._fence(session, st.experiment_id, st.attempt, str(exc))
            return
        except InvalidTransition as exc:
            # e.g. the client cancelled while the worker finished: the store keeps the first.
            log.info("worker %s: %s", session.worker_id, exc)
            x = await self.db(self.store.get_experiment, st.experiment_id)
        self.dispatcher.renew(st.experiment_id, st.attempt)
        if x.is_final:
            self.dispatcher.release(st.experiment_id, st.attempt)
        self.live.experiment_changed(x)

    async def _on_hand_back(self, session: WorkerSession, st: pb.StateUpdate) -> None:
        """A stopping worker gives its run back: requeue without counting a restart."""
        session.draining = True
        try:
            x = await self.db(self.store.requeue, st.experiment_id, st.attempt, st.message, count_restart=False)
        except (StaleAttempt, NotFound, InvalidTransition) as exc:
            log.info("worker %s: hand-back refused: %s", session.worker_id, exc)
            return
        self.dispatcher.release(st.experiment_id, st.attempt)
        self.live.experiment_changed(x)

    async def _on_ack(self, session: WorkerSession, ack: pb.ControlAck) -> None:
        status = e.APPLIED if ack.ok else e.REJECTED
        try:
            rec = await self.db(self.store.resolve_control, ack.command_id, status=status,
                                applied_step=ack.applied_step,
                                old_value=None if math.isnan(ack.old_value) else ack.old_value,
                                new_value=None if math.isnan(ack.new_value) else ack.new_value,
                                message=ack.message)
        except NotFound:
            log.warning("worker %s acked unknown command %s", session.worker_id, ack.command_id)
            return
        self.dispatcher.renew(ack.experiment_id, ack.attempt)
        self.live.control_resolved(rec)
