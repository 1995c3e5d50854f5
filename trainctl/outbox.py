"""Everything a worker (or an attached run's SDK) sends upstream goes through one
`Outbox`, in order. Shared by workers/agent.py and trainctl/attach/.

Rows arrive already batched (the run process sends at most one batch per
`pipe.LINGER_S`, see workers/pipe.py; the SDK one per its linger), so the gRPC request iterator sends whatever is waiting
as soon as anything arrives: a fast run costs tens of messages a second, not one per
step. Acks and state updates keep their place after the rows logged before them, so the
last metrics precede the final state.

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
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from trainctl.v1 import trainctl_pb2 as pb
from trainctl.spill import UnackedBatches

log = logging.getLogger(__name__)

MAX_ROWS_PER_BATCH = 2000
_SCOPES = dict(pb.Scope.items())  # "STEP" -> 1: the enum lookup, once


class _Row(NamedTuple):  # a tuple: one per logged row, so it must be cheap to make
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
        # Producers append and set `_wake`; the sender drains everything at once.
        self._items: "deque[object]" = deque()
        self._wake = threading.Event()
        self._taken = threading.Event()  # set when the stream's iterator took what was queued
        self._seq: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self.unacked = UnackedBatches(in_memory_batches, spill_path)
        self._sticky: "OrderedDict[tuple, pb.WorkerMessage]" = OrderedDict()
        # Sticky messages a stream already took from the outbox: only these are resent
        # after a reconnect (the others are still queued, behind the rows before them).
        self._delivered: set[tuple] = set()
        # Fenced attempts: whatever of theirs is still queued is skipped, not sent.
        self._dropped: set[tuple[int, int]] = set()

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

    def add_rows(self, experiment_id: int, attempt: int, rows: list[tuple]) -> None:
        """A batch of (scope, step, epoch, wall_time, values) rows from a run process."""
        if (experiment_id, attempt) in self._dropped:
            return
        for scope, step, epoch, wall_time, values in rows:
            self._items.append(_Row(experiment_id, attempt, _SCOPES[scope], step, epoch, wall_time, values))
        self._wake.set()

    def acked(self, experiment_id: int, attempt: int, seq: int) -> None:
        with self._lock:
            self.unacked.ack(experiment_id, attempt, seq)

    def forget(self, experiment_id: int, attempt: int) -> None:
        """Drop everything of a fenced attempt: unacked batches, rows and messages still
        queued, and its sticky state/acks (the server refuses them anyway, and resending
        them after every reconnect would only cost). Rows it adds later are dropped too."""
        key = (experiment_id, attempt)
        with self._lock:
            self._dropped.add(key)
            self.unacked.forget(experiment_id, attempt)
            for k in [k for k in self._sticky if k[1:3] == key]:
                del self._sticky[k]
                self._delivered.discard(k)

    def hand_over(self, timeout: float) -> bool:
        """Wait (the GIL released) up to `timeout` s until the stream's iterator has taken
        what is queued. For a control ack sent from a training thread that holds the GIL:
        the sender thread gets it at once instead of after Python's switch interval
        (5 ms), so the ack leaves during this call. Returns whether it was taken."""
        self._taken.clear()
        self._wake.set()
        return self._taken.wait(timeout) if self._items else True

    def wake(self) -> None:
        """Wake the stream's iterator now (e.g. so it sees its `stop` at once)."""
        self._wake.set()

    def seal_queued(self) -> None:
        """While no stream is open: turn queued rows into sealed batches now, so a long
        outage keeps them in `unacked` (bounded memory, then disk) instead of an ever
        longer queue; they go out with the resends of the next stream. Other queued
        messages are dropped unless sticky (those are resent anyway)."""
        for _ in self._messages(self._drain()):
            pass

    def pending(self) -> int:
        queued = len(self._items)
        if self._dropped:
            queued = sum(1 for item in list(self._items) if _run_of(item) not in self._dropped)
        return queued + len(self.unacked)

    # ------------------------------------------------------------------ the consumer
    def stream(self, hello, heartbeat, interval: float,
               stop: threading.Event) -> Iterator[pb.WorkerMessage]:
        """The request iterator of one Connect call: hello, resends, then live traffic.
        `hello` is the message, or a function that makes it (it may wait: the call is
        open meanwhile, so a refused token is known before the hello is ready)."""
        yield hello() if callable(hello) else hello
        with self._lock:
            resend = list(self.unacked)
            sticky = [m for k, m in self._sticky.items() if k in self._delivered]
        for batch in resend:
            yield pb.WorkerMessage(metrics=batch)
        yield from sticky
        last_sent = time.monotonic()
        while not stop.is_set():
            self._wake.wait(max(0.0, interval - (time.monotonic() - last_sent)))
            # Clear before draining: anything appended after this either is drained now
            # or sets the event again, so no wake-up is lost.
            self._wake.clear()
            items = self._drain()
            if items:
                self._taken.set()
                yield from self._messages(items)
                last_sent = time.monotonic()
            elif time.monotonic() - last_sent >= interval:
                last_sent = time.monotonic()
                yield pb.WorkerMessage(heartbeat=heartbeat())

    def _drain(self) -> list[object]:
        items = []
        while self._items:
            item = self._items.popleft()
            if self._dropped and _run_of(item) in self._dropped:
                continue
            items.append(item)
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
        key: tuple = ()  # (experiment_id, attempt, scope, names) of `batch`, kept in Python:
        for r in rows:   # reading them back from the message costs more than the row itself
            names = sorted(r.values)
            if batch is None or key != (r.experiment_id, r.attempt, r.scope, names):
                if batch is not None:
                    yield self._seal(batch)
                key = (r.experiment_id, r.attempt, r.scope, names)
                batch = pb.MetricBatch(experiment_id=r.experiment_id, attempt=r.attempt, scope=r.scope, names=names)
            add = batch.rows.add
            values = r.values
            add(step=r.step, epoch=r.epoch, wall_time=r.wall_time, values=[values[n] for n in names])
        if batch is not None:
            yield self._seal(batch)

    def _seal(self, batch: pb.MetricBatch) -> pb.WorkerMessage:
        key = (batch.experiment_id, batch.attempt)
        with self._lock:
            batch.seq = self._seq.get(key, 0) + 1
            self._seq[key] = batch.seq
            self.unacked.add((*key, batch.seq), batch)
        return pb.WorkerMessage(metrics=batch)


def _run_of(item: object) -> tuple[int, int]:
    if isinstance(item, _Row):
        return item.experiment_id, item.attempt
    body = getattr(item, item.WhichOneof("msg"))  # type: ignore[union-attr]
    return getattr(body, "experiment_id", 0), getattr(body, "attempt", 0)


def _sticky_key(msg: pb.WorkerMessage) -> tuple:
    kind = msg.WhichOneof("msg")
    body = getattr(msg, kind)
    return kind, body.experiment_id, body.attempt, getattr(body, "command_id", "")
