"""Everything a worker sends upstream goes through one `Outbox`, in order.

The training loop hands rows to `RunSink.log` (never blocks, and does not wake the
sender: an append to an in-memory deque). The gRPC request iterator drains the outbox
every `LINGER_S` while rows flow, so a fast run sends tens of messages a second instead
of one per step (each message costs both processes about a millisecond of CPU, which a
short step cannot spare). Acks and state updates wake the sender at once, and keep their
place after the rows logged before them, so the last metrics precede the final state.

Batches stay in `unacked` (spilling to disk past a bound) until the server's BatchAck,
so after a reconnect they are sent again; the store ignores copies it already has. State updates and
control acks are "sticky": the latest ones are sent again after every reconnect (the
server treats a repeated state or ack as a no-op), so a run that finished while the
server was down is not left RUNNING.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from trainctl.v1 import trainctl_pb2 as pb
from trainctl.workers.spill import UnackedBatches

log = logging.getLogger(__name__)

MAX_ROWS_PER_BATCH = 2000
LINGER_S = 0.02


@dataclass(frozen=True)
class _Row:
    experiment_id: int
    attempt: int
    scope: int
    step: int
    epoch: int
    wall_time: float
    values: dict


class Outbox:
    MAX_STICKY = 1000

    def __init__(self, in_memory_batches: int = 10_000, spill_path: Optional[Path] = None):
        # A deque, not a queue.Queue: a row from the training thread must not wake the
        # sender (one wake-up and GIL hand-off per step cost a short step ~10%). The
        # sender drains every LINGER_S while rows flow; only a row that finds it parked,
        # or an urgent message (state, ack), sets `_wake`.
        self._items: "deque[object]" = deque()
        self._wake = threading.Event()
        self._parked = True
        self._seq: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self.unacked = UnackedBatches(in_memory_batches, spill_path)
        self._sticky: "OrderedDict[tuple, pb.WorkerMessage]" = OrderedDict()
        # Sticky messages a stream already took from the outbox: only these are resent
        # after a reconnect (the others are still queued, behind the rows before them).
        self._delivered: set[tuple] = set()

    # ------------------------------------------------------------------ producers
    def send(self, msg: pb.WorkerMessage, *, sticky: bool = False) -> None:
        if sticky:
            with self._lock:
                key = _sticky_key(msg)
                self._sticky.pop(key, None)
                self._sticky[key] = msg
                self._delivered.discard(key)
                while len(self._sticky) > self.MAX_STICKY:
                    self._delivered.discard(self._sticky.popitem(last=False)[0])
        self._items.append(msg)
        self._wake.set()

    def row(self, experiment_id: int, attempt: int, scope: str, step: int, epoch: int, values: dict) -> None:
        self._items.append(_Row(experiment_id, attempt, pb.Scope.Value(scope), step, epoch, time.time(), values))
        if self._parked:
            self._parked = False
            self._wake.set()

    def add_rows(self, experiment_id: int, attempt: int, rows: list[tuple]) -> None:
        """Rows already batched elsewhere (a run process): (scope, step, epoch, wall_time,
        values) each. They wake the sender at once rather than waiting out a linger."""
        for scope, step, epoch, wall_time, values in rows:
            self._items.append(_Row(experiment_id, attempt, pb.Scope.Value(scope), step, epoch, wall_time, values))
        self._wake.set()

    def acked(self, experiment_id: int, attempt: int, seq: int) -> None:
        with self._lock:
            self.unacked.ack(experiment_id, attempt, seq)

    def forget(self, experiment_id: int, attempt: int) -> None:
        """Drop what is still unacked for a fenced attempt: the server refuses it anyway."""
        with self._lock:
            self.unacked.forget(experiment_id, attempt)

    def pending(self) -> int:
        return len(self._items) + len(self.unacked)

    # ------------------------------------------------------------------ the consumer
    def stream(self, hello: pb.WorkerMessage, heartbeat, interval: float,
               stop: threading.Event) -> Iterator[pb.WorkerMessage]:
        """The request iterator of one Connect call: hello, resends, then live traffic.

        While rows flow the sender wakes every LINGER_S and sends what collected, so a
        fast run sends tens of messages a second whatever its step rate; an urgent
        message cuts the wait short. After a wait with nothing to send it parks until
        the next row, or a heartbeat is due.
        """
        yield hello
        with self._lock:
            resend = list(self.unacked)
            sticky = [m for k, m in self._sticky.items() if k in self._delivered]
        for batch in resend:
            yield pb.WorkerMessage(metrics=batch)
        yield from sticky
        last_sent = time.monotonic()
        timeout = 0.0
        while not stop.is_set():
            self._wake.wait(timeout)
            self._parked = False
            # Clear before draining: anything appended after this either is drained now
            # or sets the event again, so no wake-up is lost.
            self._wake.clear()
            items = self._drain()
            if items:
                yield from self._messages(items)
                last_sent = time.monotonic()
                timeout = LINGER_S
                continue
            if time.monotonic() - last_sent >= interval:
                last_sent = time.monotonic()
                yield pb.WorkerMessage(heartbeat=heartbeat())
            self._parked = True
            # A row that landed before `_parked` was set did not wake us: look again.
            timeout = 0.0 if self._items else max(0.0, interval - (time.monotonic() - last_sent))

    def _drain(self) -> list[object]:
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items

    def _messages(self, items: list[object]) -> Iterator[pb.WorkerMessage]:
        """`items` as messages, in order: runs of rows become metric batches."""
        rows: list[_Row] = []
        for item in items:
            if isinstance(item, _Row):
                rows.append(item)
                if len(rows) >= MAX_ROWS_PER_BATCH:
                    yield from self._batches(rows)
                    rows = []
            else:
                yield from self._batches(rows)
                rows = []
                if item.WhichOneof("msg") in ("state", "ack"):  # type: ignore[union-attr]
                    with self._lock:
                        self._delivered.add(_sticky_key(item))
                yield item  # type: ignore[misc]
        yield from self._batches(rows)

    def _batches(self, rows: list[_Row]) -> Iterator[pb.WorkerMessage]:
        batch: Optional[pb.MetricBatch] = None
        for r in rows:
            names = sorted(r.values)
            if batch is None or (batch.experiment_id, batch.attempt, batch.scope) != (r.experiment_id, r.attempt, r.scope) \
                    or list(batch.names) != names:
                if batch is not None:
                    yield self._seal(batch)
                batch = pb.MetricBatch(experiment_id=r.experiment_id, attempt=r.attempt, scope=r.scope, names=names)
            batch.rows.add(step=r.step, epoch=r.epoch, wall_time=r.wall_time, values=[r.values[n] for n in names])
        if batch is not None:
            yield self._seal(batch)

    def _seal(self, batch: pb.MetricBatch) -> pb.WorkerMessage:
        key = (batch.experiment_id, batch.attempt)
        with self._lock:
            batch.seq = self._seq.get(key, 0) + 1
            self._seq[key] = batch.seq
            self.unacked.add((*key, batch.seq), batch)
        return pb.WorkerMessage(metrics=batch)


def _sticky_key(msg: pb.WorkerMessage) -> tuple:
    kind = msg.WhichOneof("msg")
    body = getattr(msg, kind)
    return kind, body.experiment_id, body.attempt, getattr(body, "command_id", "")


class RunSink:
    """The `MetricsSink` the training loop gets for one attempt."""

    def __init__(self, outbox: Outbox, experiment_id: int, attempt: int):
        self.outbox, self.experiment_id, self.attempt = outbox, experiment_id, attempt

    def log(self, scope: str, step: int, epoch: int, values: dict[str, float]) -> None:
        self.outbox.row(self.experiment_id, self.attempt, scope, step, epoch, values)

    def flush(self) -> None:
        pass  # the request iterator sends as soon as rows are there
