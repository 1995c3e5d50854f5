"""Lease time that only runs while the server can hear its workers.

A worker's lease expires when the server has not heard from it for `lease_timeout`
seconds of *lease time*. Lease time is the monotonic clock minus the time in which
silence proves nothing about the worker (issue 10 item 5: a stall of the server or
of its database is never blamed on a worker):

- the server process was not running (SIGSTOP, a suspended VM) or its event loop was
  stalled: the dispatcher ticks the clock every ~0.5 s and a tick adds at most
  `max_step` seconds, however long it has been since the last one;
- the database was stalled: a store call has been in flight for more than `stall_s`
  (a held write lock, a full disk, a slow network filesystem), or the last store call
  failed with StoreUnavailable. A worker's stream is read in order, so a metric write
  stuck on the database also holds back the heartbeats queued behind it; pausing lease
  time while any store call is stuck covers exactly that case, without a second
  writer task per session (which would need its own bounded queue and ordering rules).

`DbHealth` is fed by `Live.db` (every store call) and by the workers stream's retry
loop (a write retried through an outage counts as one call in flight throughout).
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from trainctl.server.store.errors import StoreUnavailable


class DbHealth:
    """Whether the store is answering: its calls in flight and the last call's outcome."""

    def __init__(self, stall_s: float = 1.0, *, now: Callable[[], float] = time.monotonic):
        self.stall_s = stall_s
        self._now = now
        self._inflight: dict[int, float] = {}  # call token -> start time
        self._ids = itertools.count()
        self.failed = False  # the last finished call raised StoreUnavailable

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Wrap one store call (or one retry loop): records it while in flight."""
        token = next(self._ids)
        self._inflight[token] = self._now()
        try:
            yield
        except StoreUnavailable:
            self.failed = True
            raise
        else:
            self.failed = False
        finally:
            del self._inflight[token]

    def stalled_for(self) -> float:
        """How long the oldest call in flight has been waiting (0 when none)."""
        return self._now() - min(self._inflight.values()) if self._inflight else 0.0

    def healthy(self) -> bool:
        return not self.failed and self.stalled_for() <= self.stall_s


class LeaseClock:
    """Seconds of lease time; `tick` advances it (the dispatcher calls it each pass)."""

    def __init__(self, healthy: Callable[[], bool], *, max_step: float = 1.0,
                 now: Callable[[], float] = time.monotonic):
        self._healthy = healthy
        self.max_step = max_step
        self._now = now
        self._last = now()
        self._t = 0.0

    def tick(self) -> float:
        t = self._now()
        elapsed, self._last = max(0.0, t - self._last), t
        if self._healthy():
            self._t += min(elapsed, self.max_step)
        return self._t

    def now(self) -> float:
        """Lease time now: the last tick plus what the next tick would add so far (a
        renewal between ticks is not dated up to a tick interval in the past)."""
        if not self._healthy():
            return self._t
        return self._t + min(max(0.0, self._now() - self._last), self.max_step)


@dataclass
class Lease:
    attempt: int
    worker_id: str
    expires_at: float  # in LeaseClock time
    sent: bool = True  # the assignment reached the worker's stream (False: a store outage stopped it)
