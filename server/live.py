"""Shared server state: the store (reached through a thread pool, since it blocks),
the live fan-out hub, and the futures of Control calls waiting for their ack."""
from __future__ import annotations

import asyncio
import functools
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from trainctl.server import convert
from trainctl.server.hub import Hub
from trainctl.server.prometheus import ServerStats
from trainctl.server.store import AbstractStore, entities as e
from trainctl.v1 import trainctl_pb2 as pb


class Live:
    def __init__(self, store: AbstractStore, *, db_threads: int = 4, hub: Hub | None = None):
        self.store = store
        self.hub = hub or Hub()
        self.stats = ServerStats()
        self._executor = ThreadPoolExecutor(max_workers=db_threads, thread_name_prefix="store")
        self._waiters: dict[str, list[asyncio.Future]] = defaultdict(list)

    async def db(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def publish(self, experiment_id: int, event: pb.WatchEvent) -> None:
        self.hub.publish(experiment_id, event)

    def experiment_changed(self, x: e.Experiment) -> None:
        self.hub.publish(x.id, pb.WatchEvent(experiment=convert.experiment_to_pb(x)))

    def control_resolved(self, rec: e.ControlRecord) -> None:
        self.stats.control_resolved(rec)
        for fut in self._waiters.pop(rec.command_id, []):
            if not fut.done():
                fut.set_result(rec)
        self.hub.publish(rec.experiment_id, pb.WatchEvent(control=convert.control_to_pb(rec)))

    def expect_control(self, command_id: str) -> asyncio.Future:
        """Register interest in a command's ack *before* sending it, so an ack that comes
        back at once cannot be missed; then `await wait_control(...)`."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters[command_id].append(fut)
        return fut

    async def wait_control(self, command_id: str, fut: asyncio.Future, timeout: float) -> e.ControlRecord | None:
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(command_id)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[command_id]
