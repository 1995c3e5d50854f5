"""The in-process lock that serialises SQLite writes (sqlalchemy_store's concurrency model).

First come, first served, and it can tell a holder that someone is waiting. A long
write (a worker's metric batch of a second or more of rows) commits in parts when a
short one (a control command, its ack) waits, so the short one waits for one part, not
for the whole batch. threading.Lock cannot do either: a thread that releases it and
takes it again at once usually wins over the waiter it just woke.
"""
from __future__ import annotations

import threading
from collections import deque


class FairLock:
    def __init__(self):
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            baton = threading.Lock()
            baton.acquire()
            self._waiters.append(baton)
        baton.acquire()  # released by the holder's release(): the lock is ours, still held

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()  # handed over: _held stays True
            else:
                self._held = False

    def waiting(self) -> bool:
        """Whether another thread waits for the lock (read without the mutex: a hint)."""
        return bool(self._waiters)

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class NoLock:
    """PostgreSQL: row locks do the work, nothing to serialise in-process."""

    def waiting(self) -> bool:
        return False

    def __enter__(self) -> "NoLock":
        return self

    def __exit__(self, *exc) -> None:
        return None
