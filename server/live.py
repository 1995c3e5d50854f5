"""Shared server state: the store (reached through a thread pool, since it blocks),
the live fan-out hub, the futures of Control calls waiting for their ack, and the
store's health (what the lease clock asks: see leases.py)."""
from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from trainctl.server import convert
from trainctl.server.hub import Hub
from trainctl.server.leases import DbHealth
from trainctl.server.prometheus import ServerStats
from trainctl.server.store import AbstractStore, entities as e
from trainctl.server.store.errors import StoreError
from trainctl.v1 import trainctl_pb2 as pb

log = logging.getLogger(__name__)

# A store call in flight longer than this pauses lease time (leases.py).
DB_STALL_S = 1.0


class Live:
    def __init__(self, store: AbstractStore, *, db_threads: int = 4, hub: Hub | None = None,
                 db_stall_s: float = DB_STALL_S):
        self.store = store
        self.hub = hub or Hub()
        # `Logs -f` followers (server/logs_rpc.py): new lines as pb.LogBatch and the
        # experiment's changes as pb.WatchEvent. Apart from `hub`, so Watch streams and
        # the console never see log lines, nor followers metrics.
        self.log_hub = Hub()
        self.stats = ServerStats()
        self.health = DbHealth(db_stall_s)
        self._executor = ThreadPoolExecutor(max_workers=db_threads, thread_name_prefix="store")
        # Keyed by (experiment_id, command_id): a command id names one command of one
        # experiment, so an ack of experiment B never answers a Control call about A.
        self._waiters: dict[tuple[int, str], list[asyncio.Future]] = defaultdict(list)

    async def db(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        with self.health.call():
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def publish(self, experiment_id: int, event: pb.WatchEvent) -> None:
        self.hub.publish(experiment_id, event)

    def experiment_changed(self, x: e.Experiment) -> None:
        event = pb.WatchEvent(experiment=convert.experiment_to_pb(x))
        self.hub.publish(x.id, event)
        self.log_hub.publish(x.id, event)  # a follower ends at the final state

    async def run_changed(self, x: e.Experiment) -> None:
        """Publish a state change; when it is the run's end, also the commands that the
        store expired with it (Watch shows them; Control calls waiting on them return)."""
        # The commands first: a Watch stream ends at the final experiment event.
        if x.is_final:
            try:
                expired = await self.db(self.store.list_controls, x.id, status=e.EXPIRED)
            except StoreError as exc:  # stored EXPIRED all the same; Get/Watch history show them
                log.warning("experiment %d ended; could not publish its expired commands: %s", x.id, exc)
                expired = []
            for rec in expired:
                log.info("control %s of experiment %d EXPIRED: %s", rec.command_id, x.id, rec.message)
                self.control_resolved(rec)
        self.experiment_changed(x)

    def control_resolved(self, rec: e.ControlRecord) -> None:
        self.stats.control_resolved(rec)
        for fut in self._waiters.pop((rec.experiment_id, rec.command_id), []):
            if not fut.done():
                fut.set_result(rec)
        self.hub.publish(rec.experiment_id, pb.WatchEvent(control=convert.control_to_pb(rec)))

    def expect_control(self, experiment_id: int, command_id: str) -> asyncio.Future:
        """Register interest in a command's ack *before* sending it, so an ack that comes
        back at once cannot be missed; then `await wait_control(...)`."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters[(experiment_id, command_id)].append(fut)
        return fut

    async def wait_control(self, experiment_id: int, command_id: str, fut: asyncio.Future,
                           timeout: float) -> e.ControlRecord | None:
        key = (experiment_id, command_id)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(key)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[key]
