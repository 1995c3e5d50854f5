"""Everything a worker sends upstream goes through one `Outbox`, in order.

The training loop hands rows to `RunSink.log` (never blocks: a put on an in-memory
queue). The gRPC request iterator drains the outbox: after the first row of a batch it
lingers up to `LINGER_S` for more, so a fast run sends tens of messages a second instead
of one per step (each message costs both processes about a millisecond of CPU, which a
short step cannot spare). Acks and state updates end the linger at once, and keep their
place after the rows logged before them, so the last metrics precede the final state.

Batches stay in `unacked` (spilling to disk past a bound) until the server's BatchAck,
so after a reconnect they are sent again; the store ignores copies it already has. State updates and
control acks are "sticky": the latest ones are sent again after every reconnect (the
server treats a repeated state or ack as a no-op), so a run that finished while the
server was down is not left RUNNING.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
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
        self._q: "queue.Queue[object]" = queue.Queue()
        self._seq: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self.unacked = UnackedBatches(in_memory_batches, spill_path)
        self._sticky: "OrderedDict[tuple, pb.WorkerMessage]" = OrderedDict()
        # Sticky messages a stream already took from the queue: only these are resent
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
        self._q.put(msg)

    def row(self, experiment_id: int, attempt: int, scope: str, step: int, epoch: int, values: dict) -> None:
        self._q.put(_Row(experiment_id, attempt, pb.Scope.Value(scope), step, epoch, time.time(), values))

    def acked(self, experiment_id: int, attempt: int, seq: int) -> None:
        with self._lock:
            self.unacked.ack(experiment_id, attempt, seq)

    def forget(self, experiment_id: int, attempt: int) -> None:
        """Drop what is still unacked for a fenced attempt: the server refuses it anyway."""
        with self._lock:
            self.unacked.forget(experiment_id, attempt)

    def pending(self) -> int:
        return self._q.qsize() + len(self.unacked)

    # ------------------------------------------------------------------ the consumer
    def stream(self, hello: pb.WorkerMessage, heartbeat, interval: float,
               stop: threading.Event) -> Iterator[pb.WorkerMessage]:
        """The request iterator of one Connect call: hello, resends, then live traffic."""
        yield hello
        with self._lock:
            resend = list(self.unacked)
            sticky = [m for k, m in self._sticky.items() if k in self._delivered]
        for batch in resend:
            yield pb.WorkerMessage(metrics=batch)
        yield from sticky
        last_sent = time.monotonic()
        while not stop.is_set():
            timeout = max(0.0, interval - (time.monotonic() - last_sent))
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                last_sent = time.monotonic()
                yield pb.WorkerMessage(heartbeat=heartbeat())
                continue
            for msg in self._with_waiting_rows(self._linger(item)):
                yield msg
            last_sent = time.monotonic()

    def _linger(self, first: object) -> list[object]:
        items = [first]
        if not isinstance(first, _Row):
            return items
        deadline = time.monotonic() + LINGER_S
        while len(items) < MAX_ROWS_PER_BATCH:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                item = self._q.get(timeout=left)
            except queue.Empty:
                break
            items.append(item)
            if not isinstance(item, _Row):
                break
        return items

    def _with_waiting_rows(self, items: list[object]) -> Iterator[pb.WorkerMessage]:
        """Batches of `items` and of whatever else is already waiting, in order."""
        rows: list[_Row] = []
        for item in itertools.chain(items, self._waiting()):
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

    def _waiting(self) -> Iterator[object]:
        while True:
            try:
                yield self._q.get_nowait()
            except queue.Empty:
                return

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
