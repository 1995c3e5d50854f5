"""Connected workers, FIFO dispatch and leases.

A worker holds a lease on the run it trains; any message about that run renews it.
When a lease expires the attempt is fenced in the store (its late messages are
refused) and the experiment goes back to the queue, or fails after max_restarts.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

from trainctl.server import convert
from trainctl.server.store import AbstractStore, entities as e
from trainctl.server.store.errors import StoreError
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.wire import struct_from_dict

log = logging.getLogger(__name__)

DbCall = Callable[..., Awaitable]


@dataclass
class WorkerSession:
    worker_id: str
    hostname: str
    gpus: int
    outbox: "asyncio.Queue[Optional[pb.ServerMessage]]" = field(default_factory=asyncio.Queue)
    connected_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    # (experiment_id, attempt) the worker trains now, None when idle.
    current: Optional[tuple[int, int]] = None
    draining: bool = False  # handed its run back because it is stopping: assign nothing
    # Its lease expired while the stream stayed open (a frozen process): assign nothing
    # until it speaks again.
    suspect: bool = False
    # Highest stored seq per (experiment_id, attempt) not yet acknowledged: acks are
    # cumulative, so one per ACK_DELAY_S does (every message wakes worker threads that
    # compete with its training thread for the GIL).
    _acks: dict[tuple[int, int], int] = field(default_factory=dict)

    ACK_DELAY_S = 0.1

    def send(self, msg: pb.ServerMessage) -> None:
        self.outbox.put_nowait(msg)

    def ack_later(self, experiment_id: int, attempt: int, seq: int) -> None:
        if not self._acks:
            asyncio.get_running_loop().call_later(self.ACK_DELAY_S, self._send_acks)
        key = (experiment_id, attempt)
        self._acks[key] = max(seq, self._acks.get(key, 0))

    def _send_acks(self) -> None:
        acks, self._acks = self._acks, {}
        for (experiment_id, attempt), seq in acks.items():
            self.send(pb.ServerMessage(batch_ack=pb.BatchAck(experiment_id=experiment_id, attempt=attempt, seq=seq)))

    def close(self) -> None:
        self.outbox.put_nowait(None)


@dataclass
class Lease:
    attempt: int
    worker_id: str
    expires_at: float


class Dispatcher:
    def __init__(self, store: AbstractStore, db: DbCall, *, lease_timeout: float,
                 on_experiment_change: Callable[[e.Experiment], None], recovery_grace: float = 10.0):
        self.store = store
        self.db = db
        self.lease_timeout = lease_timeout
        self.recovery_grace = recovery_grace
        self.on_experiment_change = on_experiment_change
        self.sessions: dict[str, WorkerSession] = {}
        self.leases: dict[int, Lease] = {}
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        # Runs that were live when the server stopped keep a fresh lease (plus time for
        # workers to notice and reconnect): their workers re-adopt them; if none does in
        # time they are requeued.
        expires = time.monotonic() + self.lease_timeout + self.recovery_grace
        for x in await self.db(self.store.list_experiments, [e.ASSIGNED, e.RUNNING], 100_000):
            self.leases[x.id] = Lease(x.attempt, x.worker_id or "", expires)
        self._task = asyncio.create_task(self._run(), name="dispatcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for s in self.sessions.values():
            s.close()

    def kick(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ workers
    def live_session(self, worker_id: str, quiet_after: float) -> Optional[WorkerSession]:
        """The connected session of `worker_id` if it was heard from in `quiet_after` s."""
        old = self.sessions.get(worker_id)
        return old if old is not None and time.monotonic() - old.last_seen < quiet_after else None

    def register(self, session: WorkerSession) -> None:
        old = self.sessions.get(session.worker_id)
        if old is not None:
            old.close()  # the same worker reconnected and the old stream went quiet
        self.sessions[session.worker_id] = session
        self.kick()

    def unregister(self, session: WorkerSession) -> None:
        if self.sessions.get(session.worker_id) is session:
            del self.sessions[session.worker_id]

    def session_for(self, experiment_id: int) -> Optional[WorkerSession]:
        lease = self.leases.get(experiment_id)
        session = self.sessions.get(lease.worker_id) if lease else None
        return session if session and session.current and session.current[0] == experiment_id else None

    def renew(self, experiment_id: int, attempt: int) -> bool:
        lease = self.leases.get(experiment_id)
        if lease is None or lease.attempt != attempt:
            return False
        lease.expires_at = time.monotonic() + self.lease_timeout
        return True

    def adopt(self, session: WorkerSession, experiment_id: int, attempt: int) -> bool:
        """A reconnecting worker still trains `experiment_id`: keep it if its lease holds."""
        lease = self.leases.get(experiment_id)
        if lease is None or lease.attempt != attempt or lease.worker_id != session.worker_id:
            return False
        session.current = (experiment_id, attempt)
        lease.expires_at = time.monotonic() + self.lease_timeout
        return True

    def release(self, experiment_id: int, attempt: int) -> None:
        """The run ended (final state): free its worker for the next assignment."""
        lease = self.leases.get(experiment_id)
        if lease is not None and lease.attempt == attempt:
            del self.leases[experiment_id]
            session = self.sessions.get(lease.worker_id)
            if session is not None and session.current == (experiment_id, attempt):
                session.current = None
        self.kick()

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._expire_leases()
                await self._assign()
            except Exception:  # never let one bad pass stop dispatching
                log.exception("dispatch pass failed")

    async def _assign(self) -> None:
        idle = sorted((s for s in self.sessions.values() if s.current is None and not s.draining and not s.suspect), key=lambda s: s.connected_at)
        for session in idle:
            x = await self.db(self.store.claim_next, session.worker_id, session.gpus)
            if x is None:
                continue
            controls = await self.db(self.store.list_controls, x.id)
            self.leases[x.id] = Lease(x.attempt, session.worker_id, time.monotonic() + self.lease_timeout)
            session.current = (x.id, x.attempt)
            session.send(pb.ServerMessage(assignment=pb.Assignment(
                experiment_id=x.id, attempt=x.attempt, name=x.name, spec=struct_from_dict(x.spec),
                controls=[convert.control_to_pb(c) for c in controls if c.status != e.REJECTED])))
            log.info("assigned experiment %d (attempt %d) to worker %s", x.id, x.attempt, session.worker_id)
            self.on_experiment_change(x)

    async def _expire_leases(self) -> None:
        now = time.monotonic()
        for exp_id, lease in list(self.leases.items()):
            if lease.expires_at > now:
                continue
            del self.leases[exp_id]
            session = self.sessions.get(lease.worker_id)
            if session is not None and session.current == (exp_id, lease.attempt):
                session.current = None
                session.suspect = True
                session.send(pb.ServerMessage(cancel=pb.CancelRun(
                    experiment_id=exp_id, attempt=lease.attempt, reason="lease expired; attempt fenced")))
            reason = f"worker {lease.worker_id or '?'} lost (no heartbeat for {self.lease_timeout:g} s)"
            try:
                x = await self.db(self.store.requeue, exp_id, lease.attempt, reason)
            except StoreError as exc:  # already finished or fenced meanwhile
                log.info("lease of experiment %d expired but not requeued: %s", exp_id, exc)
                continue
            log.warning("experiment %d attempt %d: %s -> %s", exp_id, lease.attempt, reason, x.state)
            self.on_experiment_change(x)
