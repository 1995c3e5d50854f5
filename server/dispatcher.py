"""Connected workers, FIFO dispatch and leases.

A worker session holds a lease on the run it trains; a message about that run from
that session renews it, from any other session it is refused (`holds`). Leases run on
lease time (leases.py), which stops while the server or its database is stalled.
When a lease expires the experiment is requeued in the store first (which fences the
attempt: its late messages are refused) and only then is the lease dropped and the
worker told to stop; if the store cannot be written the lease is kept and the requeue
retried on the next pass, so no run is ever left RUNNING without a lease.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from trainctl.server import convert
from trainctl.server.artifacts.service import artifact_to_pb
from trainctl.server.leases import Lease, LeaseClock
from trainctl.server.live import Live
from trainctl.server.store import entities as e
from trainctl.server.store.errors import StoreError, StoreUnavailable
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.wire import struct_from_dict

log = logging.getLogger(__name__)

TICK_S = 0.5  # a dispatch pass at least this often (lease expiry, assignment)
ENDED_KEPT = 1024  # recently ended runs remembered (whose late messages are no forgery)


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
    # An attached run's SDK (its run token checked on Connect): it speaks for that one
    # run and is never assigned anything.
    attached: bool = False
    # Hello.accepts_code: it may be given CODE runs (not `trainctl worker --no-code`).
    accepts_code: bool = False
    # Its lease expired while the stream stayed open (a frozen process): assign nothing
    # until it speaks again.
    suspect: bool = False
    # Latest Heartbeat.usage (pb.DeviceUsage), for ListWorkers and the console.
    usage: list = field(default_factory=list)
    # Experiments this session sent a message about without holding their lease:
    # each is logged once, not once per message.
    refused: set = field(default_factory=set)
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

    def ack_final(self, experiment_id: int, attempt: int) -> None:
        """The run's final state is stored: its pending acks go now, not ACK_DELAY_S
        later, the run's with `final` set (its sender waits for that to finish)."""
        self._send_acks(final=(experiment_id, attempt))

    def _send_acks(self, final: Optional[tuple[int, int]] = None) -> None:
        acks, self._acks = self._acks, {}
        if final is not None:
            acks.setdefault(final, 0)  # seq 0: no batch since the last ack
        for (experiment_id, attempt), seq in acks.items():
            self.send(pb.ServerMessage(batch_ack=pb.BatchAck(experiment_id=experiment_id, attempt=attempt, seq=seq,
                                                             final=(experiment_id, attempt) == final)))

    def close(self) -> None:
        self.outbox.put_nowait(None)


class Dispatcher:
    heartbeat_interval = 2.0  # the Workers stream's (WorkersService sets it); Attach answers with it

    def __init__(self, live: Live, *, lease_timeout: float, recovery_grace: float = 10.0,
                 clock: LeaseClock | None = None):
        self.live = live
        self.store = live.store
        self.db = live.db
        self.lease_timeout = lease_timeout
        self.recovery_grace = recovery_grace
        # Ticks come every TICK_S; one adds at most two of them (a stopped process or a
        # stalled loop counts as ~1 s, not as its real length).
        self.clock = clock or LeaseClock(live.health.healthy, max_step=2 * TICK_S)
        self.sessions: dict[str, WorkerSession] = {}
        self.leases: dict[int, Lease] = {}
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._outage: Optional[str] = None  # the store error of the outage being ridden out
        # experiment_id -> (worker_id, attempt) of runs that ended (final state or hand-back)
        # while holding their lease: their stragglers are refused like any other message
        # without a lease, but logged as routine, not as a possible forgery.
        self.ended: OrderedDict[int, tuple[str, int]] = OrderedDict()
        # Live ATTACHED runs: only their attached session may re-adopt them, and a lost
        # lease ends them FAILED (the store's requeue), never requeued elsewhere.
        self.attached: set[int] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        # Runs that were live when the server stopped keep a fresh lease (plus time for
        # workers to notice and reconnect): their workers re-adopt them; if none does in
        # time they are requeued.
        expires = self.clock.now() + self.lease_timeout + self.recovery_grace
        for x in await self.db(self.store.list_experiments, [e.ASSIGNED, e.RUNNING], 100_000):
            self.leases[x.id] = Lease(x.attempt, x.worker_id or "", expires)
            if x.kind == e.ATTACHED:
                self.attached.add(x.id)
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

    def attached_attempt(self, experiment_id: int) -> Optional[int]:
        """The attempt of `experiment_id` if it is a live ATTACHED run whose SDK is
        connected now, else None. Such a run is RUNNING: its lease goes when it ends."""
        if experiment_id not in self.attached:
            return None
        session = self.session_for(experiment_id)
        return session.current[1] if session is not None else None

    def holds(self, session: WorkerSession, experiment_id: int, attempt: int) -> bool:
        """Whether `session` (the registered stream of its worker) holds the lease of
        run (experiment_id, attempt): only then are its messages about that run taken."""
        lease = self.leases.get(experiment_id)
        return (lease is not None and lease.attempt == attempt and lease.worker_id == session.worker_id
                and self.sessions.get(session.worker_id) is session)

    def renew(self, session: WorkerSession, experiment_id: int, attempt: int) -> bool:
        """Renew the lease if `session` holds it; never for anyone else."""
        if not self.holds(session, experiment_id, attempt):
            return False
        self.leases[experiment_id].expires_at = self.clock.now() + self.lease_timeout
        return True

    def hold_attached(self, x: e.Experiment) -> None:
        """A new ATTACHED run (Attach): its session holds the lease from now on, so its
        SDK has lease_timeout to connect; nobody else is ever assigned it."""
        self.leases[x.id] = Lease(x.attempt, x.worker_id or "", self.clock.now() + self.lease_timeout)
        self.attached.add(x.id)

    def adopt(self, session: WorkerSession, experiment_id: int, attempt: int) -> bool:
        """A reconnecting worker still trains `experiment_id`: keep it if its lease holds."""
        lease = self.leases.get(experiment_id)
        if experiment_id in self.attached and not session.attached:
            return False  # only the session that proved its run token
        if lease is None or lease.attempt != attempt or lease.worker_id != session.worker_id:
            return False
        session.current = (experiment_id, attempt)
        lease.expires_at = self.clock.now() + self.lease_timeout
        log.info("worker %s re-adopted experiment %d attempt %d", session.worker_id, experiment_id, attempt)
        return True

    def release(self, experiment_id: int, attempt: int) -> None:
        """The run ended (final state) or was handed back: free its worker."""
        lease = self.leases.get(experiment_id)
        if lease is not None and lease.attempt == attempt:
            del self.leases[experiment_id]
            self.attached.discard(experiment_id)
            self.ended[experiment_id] = (lease.worker_id, attempt)
            while len(self.ended) > ENDED_KEPT:
                self.ended.popitem(last=False)
            session = self.sessions.get(lease.worker_id)
            if session is not None and session.current == (experiment_id, attempt):
                session.current = None
        self.kick()

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=TICK_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.run_once()

    async def run_once(self) -> None:
        """One dispatch pass: advance lease time, expire leases, assign queued runs."""
        self.clock.tick()
        try:
            await self._expire_leases()
            await self._assign()
        except StoreUnavailable as exc:
            self._store_down(exc)
            return
        except Exception:  # never let one bad pass stop dispatching
            log.exception("dispatch pass failed")
            return
        if self._outage is not None:
            log.warning("store reachable again after: %s", self._outage)
            self._outage = None

    def _store_down(self, exc: StoreUnavailable) -> None:
        if self._outage is None:  # once per outage, not once per pass
            log.warning("store unavailable; leases kept, dispatch retried every %.1f s: %s", TICK_S, exc)
            self._outage = str(exc)

    async def _assign(self) -> None:
        idle = sorted((s for s in self.sessions.values()
                       if s.current is None and not s.draining and not s.suspect and not s.attached),
                      key=lambda s: s.connected_at)
        for session in idle:
            x = await self.db(self.store.claim_next, session.worker_id, session.gpus,
                              accepts_code=session.accepts_code)
            if x is None:
                continue
            # The lease first: from here on the worker's messages about x are its own. If
            # the reads below fail (store outage) the assignment is never sent; the lease
            # then expires and the requeue counts no restart (`sent` stays False).
            lease = self.leases[x.id] = Lease(x.attempt, session.worker_id, self.clock.now() + self.lease_timeout,
                                              sent=False)
            session.current = (x.id, x.attempt)
            controls = await self.db(self.store.list_controls, x.id)
            steps, epochs = await self.db(self.store.delivered, x.id)
            store_id = await self.db(self.store.store_id)
            # The newest stored checkpoint within what the store holds (a newer one has
            # steps nobody received); the worker fetches it when its disk lacks it.
            checkpoint = await self.db(self.store.latest_checkpoint, x.id, steps)
            lease.sent = True
            session.send(pb.ServerMessage(assignment=pb.Assignment(
                experiment_id=x.id, attempt=x.attempt, name=x.name, spec=struct_from_dict(x.spec),
                controls=[convert.control_to_pb(c) for c in controls if c.status not in (e.REJECTED, e.EXPIRED)],
                store_id=store_id, delivered_steps=steps, delivered_epochs=epochs,
                code_sha256=str((x.spec or {}).get("code_sha256") or "") if x.kind == e.CODE else "",
                checkpoint=artifact_to_pb(checkpoint) if checkpoint is not None else None)))
            log.info("experiment %d attempt %d assigned to worker %s (resume bound: %d steps, %d epochs stored)",
                     x.id, x.attempt, session.worker_id, steps, epochs)
            self.live.experiment_changed(x)

    async def _expire_leases(self) -> None:
        now = self.clock.now()
        for exp_id, lease in list(self.leases.items()):
            if lease.expires_at > now or self.leases.get(exp_id) is not lease:
                continue
            reason = f"worker {lease.worker_id or '?'} lost (no heartbeat for {self.lease_timeout:g} s)"
            if exp_id in self.attached:  # the store ends it FAILED: no one else can run it
                reason = f"the attached process went silent for {self.lease_timeout:g} s"
            try:
                # Store first: if this raises StoreUnavailable the lease stays (and is
                # retried next pass, or renewed if the worker speaks meanwhile).
                x = await self.db(self.store.requeue, exp_id, lease.attempt, reason, count_restart=lease.sent)
            except StoreUnavailable:
                raise
            except StoreError as exc:  # already finished or fenced meanwhile
                log.info("lease of experiment %d attempt %d expired; not requeued: %s", exp_id, lease.attempt, exc)
                x = None
            if self.leases.get(exp_id) is lease:
                del self.leases[exp_id]
                self.attached.discard(exp_id)
            session = self.sessions.get(lease.worker_id)
            if session is not None and session.current == (exp_id, lease.attempt):
                session.current = None
                session.suspect = True
                session.send(convert.stop_message(exp_id, lease.attempt, pb.STOP_FENCED,
                                                  "lease expired; attempt fenced"))
            if x is not None:
                log.warning("experiment %d attempt %d %s: %s -> %s (restarts %d/%d)", exp_id, lease.attempt,
                            "ended" if x.kind == e.ATTACHED else "requeued", reason, x.state, x.restarts,
                            x.max_restarts)
                await self.live.run_changed(x)
