"""The worker's log shipper: a run's output lines, numbered, batched onto the outbox.

`add(experiment_id, attempt, stream, text)` is called by whoever reads the run's output
(a submitted command's stdout/stderr reader threads, the relay of a spec run's Python
logging). It never blocks on the network: it numbers the line (per attempt, from 1),
appends it under a short lock and returns. A sender thread puts batches on the agent's
outbox, one per run at most every BATCH_S (a line waits at most that long; a lone line
after a quiet spell goes at once) or as soon as BATCH_LINES are waiting.

Delivery: lines stay here until the server's LogAck (cumulative: every line up to an
index is stored) and are resent on the next stream after a reconnect (`stream` wraps
the outbox's request iterator so the resend goes right after the hello, before the
sticky final state: the server stops taking a run's lines once it has ended). The
store ignores a line it already has, so a resend is harmless.

Memory is bounded twice. At most WINDOW_BATCHES batches of a run are on the outbox
unacknowledged (during an outage nothing more piles up in the outbox's queue); and
past MAX_LINES lines or MAX_BYTES of text held here, the oldest are dropped and a
SYSTEM line "N lines dropped on the worker" takes the last dropped line's index, so it
shows where the gap is.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import Iterator, Optional

from trainctl.logtext import MAX_TEXT_BYTES, cut_text
from trainctl.v1 import trainctl_pb2 as pb

BATCH_S = 0.1
BATCH_LINES = 500
BATCH_BYTES = 1 << 20
WINDOW_BATCHES = 8
MAX_LINES = 20_000
MAX_BYTES = 8 << 20
LINE_OVERHEAD = 48  # bytes a held line costs besides its text (the tuple, its numbers)
MAX_RUNS = 256  # runs whose numbering is remembered (one runs at a time; old ones go)


class _RunLog:
    """One attempt's lines held here: `lines` in index order, (index, stream, wall_time,
    text) tuples; those up to `sent` went to the outbox, the rest are pending."""

    __slots__ = ("next", "lines", "sent", "acked", "pending_since", "sent_at", "inflight", "marker")

    def __init__(self) -> None:
        self.next = 1
        self.lines: deque[tuple[int, int, float, str]] = deque()
        self.sent = 0      # highest index handed to the outbox
        self.acked = 0     # highest index the server acknowledged
        self.pending_since: Optional[float] = None  # monotonic time of the oldest pending line
        self.sent_at = 0.0  # monotonic time of the last batch sent
        self.inflight: deque[int] = deque()  # last index of each unacknowledged batch sent
        self.marker: Optional[tuple[int, int]] = None  # (index, lines it stands for) at the left

    def pending(self) -> int:
        return self.next - 1 - self.sent


class LogShipper:
    def __init__(self, outbox, *, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES,
                 batch_s: float = BATCH_S, batch_lines: int = BATCH_LINES, window: int = WINDOW_BATCHES):
        self.outbox = outbox
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self.batch_s, self.batch_lines, self.window = batch_s, batch_lines, window
        self._lock = threading.Lock()        # the held lines (add is the hot path: kept short)
        self._send_lock = threading.Lock()   # one sender at a time, so batches leave in order
        self._runs: "OrderedDict[tuple[int, int], _RunLog]" = OrderedDict()
        self._forgotten: set[tuple[int, int]] = set()
        self._lines = 0
        self._bytes = 0
        self.dropped = 0  # lines dropped here so far (all runs)
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ producers
    def add(self, experiment_id: int, attempt: int, stream: int, text: str) -> int:
        """Hold one line (a trailing newline is dropped, a long line cut); returns its
        index (0 when the attempt was forgotten). Never blocks on the network."""
        if text.endswith("\n"):
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
        if len(text) > MAX_TEXT_BYTES // 4:  # else it fits whatever its characters
            text = cut_text(text)
        key = (experiment_id, attempt)
        with self._lock:
            if key in self._forgotten:
                return 0
            r = self._runs.get(key)
            if r is None:
                r = self._new_run(key)
            index = r.next
            r.next += 1
            r.lines.append((index, stream, time.time(), text))
            self._lines += 1
            self._bytes += len(text) + LINE_OVERHEAD
            if r.pending_since is None:  # the sender sends it now (a quiet run) or sets its timer
                r.pending_since = time.monotonic()
                wake = True
            else:  # a full batch waiting: once per batch, not per line (the window may hold it)
                wake = index - r.sent == self.batch_lines
            if self._lines > self.max_lines or self._bytes > self.max_bytes:
                self._shed()
        if self._thread is None:
            self._start()
        if wake:
            self._wake.set()
        return index

    def flush(self, experiment_id: int, attempt: int) -> None:
        """Put every pending line of the run on the outbox now, whatever the window:
        call before the run's final state, so its last lines are stored first."""
        self._send(force={(experiment_id, attempt)})

    # ------------------------------------------------------------------ from the server
    def acked(self, experiment_id: int, attempt: int, index: int) -> None:
        """LogAck: every line of the attempt up to `index` is stored."""
        with self._lock:
            r = self._runs.get((experiment_id, attempt))
            if r is None or index <= r.acked:
                return
            r.acked = min(index, r.sent)
            while r.lines and r.lines[0][0] <= r.acked:
                self._release(r.lines.popleft())
            if r.marker is not None and r.marker[0] <= r.acked:
                r.marker = None
            while r.inflight and r.inflight[0] <= r.acked:
                r.inflight.popleft()
        self._wake.set()  # the window may have room again

    def forget(self, experiment_id: int, attempt: int) -> None:
        """A fenced attempt: drop its lines and ignore any it adds later."""
        key = (experiment_id, attempt)
        with self._lock:
            self._forgotten.add(key)
            r = self._runs.pop(key, None)
            if r is not None:
                while r.lines:
                    self._release(r.lines.popleft())

    def held(self) -> tuple[int, int]:
        """(lines, bytes) held now, for tests and benchmarks."""
        with self._lock:
            return self._lines, self._bytes

    def unacked(self) -> int:
        with self._lock:
            return sum(len(r.lines) for r in self._runs.values())

    # ------------------------------------------------------------------ the stream
    def stream(self, requests: Iterator[pb.WorkerMessage]) -> Iterator[pb.WorkerMessage]:
        """Wrap a Connect request iterator: its first message (the hello), then every
        line sent before and not acknowledged (a stream broke: they may be lost), then
        the rest of it."""
        yield next(requests)
        yield from self._resend()
        yield from requests

    def _resend(self) -> list[pb.WorkerMessage]:
        with self._send_lock:
            out = []
            with self._lock:
                for (experiment_id, attempt), r in self._runs.items():
                    lines = [ln for ln in r.lines if ln[0] <= r.sent]
                    r.inflight.clear()  # what the broken stream carried is not coming back
                    for batch in _chunks(lines, self.batch_lines):
                        r.inflight.append(batch[-1][0])
                        out.append(_message(experiment_id, attempt, batch))
            return out

    # ------------------------------------------------------------------ the sender thread
    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            # Cleared before sending: a line added meanwhile sets it again, none is missed.
            self._wake.clear()
            self._wake.wait(self._send())

    def _send(self, force: frozenset | set = frozenset()) -> float:
        """Send the batches that are due; returns how long until the next one may be."""
        now = time.monotonic()
        next_due = 1.0
        with self._send_lock:
            taken = []
            with self._lock:
                for key, r in self._runs.items():
                    if not r.pending():
                        continue
                    if key not in force:
                        due = max(r.pending_since or now, r.sent_at + self.batch_s)
                        if r.pending() < self.batch_lines and due > now:
                            next_due = min(next_due, due - now)
                            continue
                        if len(r.inflight) >= self.window:
                            continue  # woken again by the next ack
                    lines = _after(r.lines, r.sent)
                    if not lines:  # cannot happen (shedding leaves a marker); never spin on it
                        r.sent, r.pending_since = r.next - 1, None
                        continue
                    room = len(lines) if key in force else (self.window - len(r.inflight)) * self.batch_lines
                    lines = lines[:room]
                    batches = _chunks(lines, self.batch_lines)
                    for batch in batches:
                        r.inflight.append(batch[-1][0])
                    r.sent = lines[-1][0]
                    r.sent_at = now
                    r.pending_since = now if r.pending() else None
                    taken.append((key, batches))
            for (experiment_id, attempt), batches in taken:  # built outside the lock: add goes on
                for batch in batches:
                    self.outbox.send(_message(experiment_id, attempt, batch))
        return next_due

    # ------------------------------------------------------------------ bounds (under _lock)
    def _new_run(self, key: tuple[int, int]) -> _RunLog:
        r = self._runs[key] = _RunLog()
        if len(self._runs) > MAX_RUNS:
            for old in [k for k, v in self._runs.items() if not v.lines and k != key][:len(self._runs) - MAX_RUNS]:
                del self._runs[old]
        return r

    def _release(self, line: tuple) -> None:
        self._lines -= 1
        self._bytes -= len(line[3]) + LINE_OVERHEAD

    def _shed(self) -> None:
        """Drop the oldest held lines down to 90% of the bounds; a SYSTEM marker line
        takes the index of the last one dropped (one marker per run: it absorbs the
        count of an earlier marker it drops)."""
        lines_goal, bytes_goal = self.max_lines * 9 // 10, self.max_bytes * 9 // 10
        for r in list(self._runs.values()):
            count, last, earlier = 0, None, 0
            while r.lines and (self._lines > lines_goal or self._bytes > bytes_goal):
                line = r.lines.popleft()
                self._release(line)
                last = line
                if r.marker is not None and line[0] == r.marker[0]:
                    earlier = r.marker[1]  # an earlier marker: already counted in `dropped`
                    count += earlier
                else:
                    count += 1
            if last is None:
                continue
            self.dropped += count - earlier
            text = (f"[trainctl] {count:,} lines dropped on the worker: more output than the server "
                    f"acknowledged (holds at most {self.max_lines:,} lines / {self.max_bytes >> 20} MB)")
            marker = (last[0], pb.SYSTEM, last[2], text)
            r.lines.appendleft(marker)
            r.marker = (last[0], count)
            self._lines += 1
            self._bytes += len(text) + LINE_OVERHEAD
            if self._lines <= lines_goal and self._bytes <= bytes_goal:
                return


def _after(lines: deque, index: int) -> list[tuple]:
    """The lines past `index` (the rightmost ones: read from the right, not the whole deque)."""
    out = []
    for ln in reversed(lines):
        if ln[0] <= index:
            break
        out.append(ln)
    out.reverse()
    return out


def _chunks(lines: list[tuple], batch_lines: int) -> list[list[tuple]]:
    """Batches of at most `batch_lines` lines and about BATCH_BYTES of text."""
    out, cur, size = [], [], 0
    for ln in lines:
        if cur and (len(cur) >= batch_lines or size + len(ln[3]) > BATCH_BYTES):
            out.append(cur)
            cur, size = [], 0
        cur.append(ln)
        size += len(ln[3])
    if cur:
        out.append(cur)
    return out


def _message(experiment_id: int, attempt: int, batch: list[tuple]) -> pb.WorkerMessage:
    return pb.WorkerMessage(logs=pb.LogBatch(
        experiment_id=experiment_id, attempt=attempt,
        lines=[pb.LogLine(attempt=attempt, index=i, stream=s, wall_time=w, text=t) for i, s, w, t in batch]))
