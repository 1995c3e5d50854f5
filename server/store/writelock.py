"""How the store orders its writes in-process (sqlalchemy_store's concurrency model).

FairLock serialises SQLite writes: first come, first served, and it can tell a holder
that a short write is waiting. A long (bulk) write (a worker's metric batch of a second
or more of rows) commits in parts when a short one (a control command, its ack) waits,
so the short one waits for one part, not for the whole batch; another batch waiting
does not cut it. threading.Lock cannot do either: a thread that releases it and takes
it again at once usually wins over the waiter it just woke.

Urgency goes further, on any database: while a client waits on a command, metric writes
step aside between their parts. The lock alone leaves the short write waiting on the
interpreter lock and the CPU instead: a batch's ~20 ms of Python and SQLite work per
second of an attached run's rows, competing with each hop of the command, made set-lr's
p99 ~30 ms where it is ~16-20 ms with no rows at all (bench/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator


class FairLock:
    def __init__(self):
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: deque[tuple[threading.Lock, bool]] = deque()  # (baton, bulk)
        self._short_waiting = 0  # waiters that are not bulk writes

    def acquire(self, bulk: bool = False) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            baton = threading.Lock()
            baton.acquire()
            self._waiters.append((baton, bulk))
            self._short_waiting += not bulk
        baton.acquire()  # released by the holder's release(): the lock is ours, still held

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                baton, bulk = self._waiters.popleft()
                self._short_waiting -= not bulk
                baton.release()  # handed over: _held stays True
            else:
                self._held = False

    def waiting(self) -> bool:
        """Whether a short write waits for the lock (read without the mutex: a hint).
        Another bulk write waiting does not count: metric batches that cut each other
        into parts commit ~10x as often, which took ingestion with 4-16 concurrent
        workers from ~190k to ~60k points/s (bench/ingest.py)."""
        return self._short_waiting > 0

    @contextlib.contextmanager
    def bulk(self) -> Iterator[None]:
        """The lock for a long write (a metric batch), which short ones may go between."""
        self.acquire(bulk=True)
        try:
            yield
        finally:
            self.release()

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class NoLock:
    """PostgreSQL: row locks do the work, nothing to serialise in-process."""

    def waiting(self) -> bool:
        return False

    def bulk(self) -> "NoLock":
        return self

    def __enter__(self) -> "NoLock":
        return self

    def __exit__(self, *exc) -> None:
        return None


class Urgency:
    """Calls that a client is waiting on mark themselves urgent (`hold`); long writes call
    `step_aside` before they start and between their parts, and wait while one is open.

    Rows are never held long: an urgent call counts for `hold_s` from its start at most
    (a command waiting for a slow step stops holding rows), and rows step aside at most
    `budget_s` in any `window_s` (a client sending commands back to back slows ingestion
    by that share, never stops it)."""

    def __init__(self, hold_s: float = 0.1, budget_s: float = 0.25, window_s: float = 1.0):
        self.hold_s, self.budget_s, self.window_s = hold_s, budget_s, window_s
        self._cond = threading.Condition()
        self._open: dict[int, float] = {}  # hold id -> when it stops counting
        self._ids = itertools.count()
        self._window_start = 0.0
        self._stepped = 0.0                # seconds stepped aside in the current window
        self.aside = 0                     # callers stepping aside now
        self.waits = 0                     # step_aside calls that waited, in all

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        key = next(self._ids)
        with self._cond:
            self._open[key] = time.monotonic() + self.hold_s
        try:
            yield
        finally:
            with self._cond:
                del self._open[key]
                self._cond.notify_all()

    def _counting_until(self, now: float) -> float:
        """When the last hold still counting stops counting; 0.0 if none does. Under _cond."""
        return max((until for until in self._open.values() if until > now), default=0.0)

    def active(self) -> bool:
        """Whether an urgent call is open and still counts."""
        if not self._open:  # the common case, without the lock
            return False
        with self._cond:
            return self._counting_until(time.monotonic()) > 0.0

    def step_aside(self) -> None:
        """Wait while an urgent call counts, within the budget. Call it holding no lock."""
        if not self._open:
            return
        with self._cond:
            now = time.monotonic()
            if now - self._window_start >= self.window_s:
                self._window_start, self._stepped = now, 0.0
            start, waited = now, False
            while True:
                left = min(self._counting_until(now), start + self.budget_s - self._stepped) - now
                if left <= 0:
                    break
                if not waited:
                    waited = True
                    self.aside += 1
                self._cond.wait(left)
                now = time.monotonic()
            self._stepped += now - start
            self.aside -= waited
            self.waits += waited
