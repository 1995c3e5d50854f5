"""Server-sent-event streams: a run page's live data and the runs table's changes.

Both read the hub, never the database, after their first message. A run stream
subscribes *before* it reads the history (like Watch), so a batch stored meanwhile is
in both and the per-scope step filter drops the second copy: no gap, no duplicate.
Each subscriber has the hub's bounded queue; one that falls behind is cut off and told
to reload ("overflow"), never allowed to grow the server. The JSON of a batch is made
once however many consoles receive it.
"""
from __future__ import annotations

import asyncio

from trainctl.server.console import jsonify
from trainctl.server.console.backend import Backend
from trainctl.v1 import trainctl_pb2 as pb

KEEPALIVE_S = 15.0
RUNS_INTERVAL_S = 0.5     # a runs table gets at most two updates a second
MAX_DRAIN = 256           # events written in one go when a console is behind
# A run page gets at most one write per this interval (what queued meanwhile goes in the
# same write): 20 frames a second is all a chart shows, and it bounds the server's cost
# per console however fast the run logs. Adds at most this to step -> chart latency.
MIN_SEND_INTERVAL_S = 0.05


def sse(obj) -> str:
    return f"data: {jsonify.dumps(obj)}\n\n"


class BatchCache:
    """JSON of recent metric batches by message identity (the hub hands every subscriber
    the same object), so N consoles cost one encoding per batch."""

    def __init__(self, size: int = 512):
        self.size = size
        self._items: dict[int, tuple[pb.MetricBatch, dict]] = {}

    def get(self, batch: pb.MetricBatch) -> dict:
        hit = self._items.get(id(batch))
        if hit is not None and hit[0] is batch:
            return hit[1]
        out = jsonify.batch(batch)
        if len(self._items) >= self.size:
            self._items.pop(next(iter(self._items)))
        self._items[id(batch)] = (batch, out)  # holding the batch keeps its id unique
        return out


def _after(b: dict, sent: dict[str, int]) -> dict | None:
    """Rows of batch json `b` past what this console already has for its scope."""
    last = sent[b["scope"]]
    rows = b["rows"]
    if rows and rows[0][0] <= last:
        rows = [r for r in rows if r[0] > last]
        if not rows:
            return None
        b = {**b, "rows": rows}
    if rows:
        sent[b["scope"]] = rows[-1][0]
    return b


async def run_events(backend: Backend, cache: BatchCache, sub, detail: dict, history: dict):
    """The stream of one run page: its detail and history, then live events."""
    hub = backend.live.hub
    try:
        yield sse({"t": "experiment", **detail})
        yield sse({"t": "history", **history})
        if detail["experiment"]["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
            yield sse({"t": "end"})
            return
        sent = dict(history["last"])
        loop = asyncio.get_running_loop()
        last_send = 0.0
        while True:
            wait = last_send + MIN_SEND_INTERVAL_S - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                event = await asyncio.wait_for(sub.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": keepalive\n\n"
                continue
            events = [event]
            while events[-1] is not None and not sub.queue.empty() and len(events) < MAX_DRAIN:
                events.append(sub.queue.get_nowait())
            out, end = [], False
            for ev in events:
                if ev is None:
                    out.append(sse({"t": "overflow", "message": f"this page fell more than {hub.queue_size} "
                                                                 f"events behind; reloading"}))
                    end = True
                    break
                which = ev.WhichOneof("event")
                if which == "metrics":
                    b = _after(cache.get(ev.metrics), sent)
                    if b is not None:
                        out.append(sse({"t": "metrics", **b}))
                elif which == "control":
                    out.append(sse({"t": "control", "control": jsonify.control(ev.control)}))
                elif which == "experiment":
                    out.append(sse({"t": "state", "experiment": jsonify.experiment(ev.experiment)}))
                    if ev.experiment.state in jsonify.FINAL:
                        out.append(sse({"t": "end"}))
                        end = True
                        break
            if out:
                yield "".join(out)
                last_send = loop.time()
            if end:
                return
    finally:
        hub.unsubscribe(sub)


async def runs_events(backend: Backend, version: int):
    """Changes to the runs table after `version` (from the GET that drew the table)."""
    board = backend.board
    while True:
        await board.wait_change(version, KEEPALIVE_S)
        if board.version <= version:
            yield ": keepalive\n\n"
            continue
        rows = board.changed_since(version)
        version = board.version
        yield sse({"t": "runs", "version": version, "runs": rows})
        await asyncio.sleep(RUNS_INTERVAL_S)
