"""Live fan-out of watch events to subscribers.

Every subscriber gets its own bounded queue. Publishing never waits: a subscriber
whose queue is full is cut off (its stream ends with RESOURCE_EXHAUSTED) instead of
slowing ingestion or anyone else. Everything here runs on the server's event loop.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Optional

from trainctl.v1 import trainctl_pb2 as pb

DEFAULT_QUEUE = 4096  # events (each a batch of rows), ~minutes of a fast run
# With many watchers on one run, each watcher's stream waits this long per watcher
# between two sends (and merges what queued meanwhile), so one run costs the server at
# most ~1 / PACE_PER_WATCHER_S sends a second however many watch it: 100 watchers get a
# send every 50 ms each instead of every batch (~40/s); a lone watcher waits 0.5 ms.
PACE_PER_WATCHER_S = 0.0005
MAX_PACE_S = 0.2


class Subscription:
    def __init__(self, experiment_id: int, maxsize: int):
        self.experiment_id = experiment_id
        self.queue: asyncio.Queue[Optional[pb.WatchEvent]] = asyncio.Queue(maxsize)
        self.overflowed = False

    async def get(self) -> Optional[pb.WatchEvent]:
        return await self.queue.get()


class Hub:
    def __init__(self, queue_size: int = DEFAULT_QUEUE):
        self.queue_size = queue_size
        self._subs: dict[int, set[Subscription]] = defaultdict(set)
        # Called with (experiment_id, event) for every event, e.g. the console's runs
        # board; each must be cheap and never block (it runs inside publish).
        self.listeners: list = []

    def subscribe(self, experiment_id: int) -> Subscription:
        sub = Subscription(experiment_id, self.queue_size)
        self._subs[experiment_id].add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.experiment_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.experiment_id]

    def publish(self, experiment_id: int, event: pb.WatchEvent) -> None:
        for listener in self.listeners:
            listener(experiment_id, event)
        for sub in list(self._subs.get(experiment_id, ())):
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._cut_off(sub)

    def pace(self, experiment_id: int) -> float:
        """Seconds a watcher of this run should leave between two sends (0: none)."""
        return min(MAX_PACE_S, PACE_PER_WATCHER_S * len(self._subs.get(experiment_id, ())))

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def _cut_off(self, sub: Subscription) -> None:
        sub.overflowed = True
        self.unsubscribe(sub)
        # Make room for the end-of-stream marker so the reader wakes up and stops.
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)
