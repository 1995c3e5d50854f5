"""`Experiments.Logs`: a run's captured output, stored lines then (with `follow`) new ones.

No gap, no duplicate: a follower subscribes to the live log hub before it reads the
store, and every line carries its key (attempt, index), so a line both stored before
the read and published after it is sent once (only keys above the last one sent go
out). A follower whose queue fills (it reads slower than the run prints) is not cut
off: it re-subscribes and catches up from the store, where nothing is lost. Every send
has a deadline, so a client that stops reading costs one page until it expires.
Memory per caller: one page (PAGE_LINES lines) and one bounded queue.
"""
from __future__ import annotations

import asyncio

from trainctl.server.guard import bad_request
from trainctl.server.store import logs as store_logs
from trainctl.server.store.entities import FINAL_STATES
from trainctl.server.watch_history import ClientStalled, Sender, answer_stalled
from trainctl.v1 import trainctl_pb2 as pb

LINGER_S = 30.0  # after a client's cancel: how long a follower waits for the worker's last lines
MESSAGE_BYTES = 1 << 20  # lines per LogBatch sent: up to about this much text
_FINAL = frozenset({pb.COMPLETED, pb.FAILED, pb.CANCELLED})


def dropped_marker(dropped: int, attempt: int) -> pb.LogLine:
    """The SYSTEM line that stands for the lines the store dropped to stay bounded."""
    return pb.LogLine(attempt=attempt, index=0, stream=pb.SYSTEM,
                      text=f"[trainctl] {dropped:,} earlier lines dropped (the server keeps the last "
                           f"{store_logs.MAX_LINES:,} lines of an experiment)")


async def logs(svc, request: pb.LogsRequest, context) -> None:
    """The body of ExperimentsService.Logs (`svc` gives db, store, live and _get)."""
    if request.tail < 0:
        await bad_request(context, "Logs", f"tail: must be >= 0 (0: every stored line), got {request.tail}")
    if request.attempt < 0:
        await bad_request(context, "Logs", f"attempt: must be >= 0 (0: every attempt), got {request.attempt}")
    await svc._get(request.id, context)  # NOT_FOUND for no such experiment
    hub = svc.live.log_hub
    sub = hub.subscribe(request.id) if request.follow else None
    stream = _Stream(svc, request, context, svc.watch_send_timeout)
    stalled = ""
    try:
        if request.tail:
            stream.last = await svc.db(svc.store.log_tail_key, request.id, request.tail, attempt=request.attempt)
        state = await svc.db(svc.store.log_state, request.id)
        floor = state["floor"]
        if state["dropped"] and stream.last <= floor and (not request.attempt or request.attempt <= floor[0]):
            await stream.send([dropped_marker(state["dropped"], floor[0])])
        await stream.history()
        if sub is None:
            return
        x = await svc.db(svc.store.get_experiment, request.id)
        if x.state in FINAL_STATES:
            await stream.history()  # lines stored between the read and the state change
            return
        while True:
            event = await sub.get()
            if event is None:  # fell behind the queue's bound: the store has every line
                hub.unsubscribe(sub)
                sub = hub.subscribe(request.id)
                await stream.history()
                continue
            if isinstance(event, pb.LogBatch):
                await stream.send_new(event.lines)
            elif event.WhichOneof("event") == "experiment" and event.experiment.state in _FINAL:
                await _linger(svc, sub, stream)
                return
    except ClientStalled as exc:
        stalled = str(exc)
    except asyncio.CancelledError:
        return  # the client left or the server is stopping
    finally:
        if sub is not None:
            hub.unsubscribe(sub)
    # Answered outside the except: the page it held is gone by then.
    await answer_stalled(context, ("logs-stalled", request.id), stalled)


async def _linger(svc, sub, stream) -> None:
    """A run cancelled by a client is final at once, but its worker still holds the
    lease while the command gets SIGTERM, its grace and SIGKILL: the lines it writes
    meanwhile ("stopping: ...", its last words) are still stored. Follow them until the
    worker lets go (or LINGER_S), then read what the store got meanwhile."""
    deadline = asyncio.get_running_loop().time() + LINGER_S
    while stream.request.id in svc.dispatcher.leases and asyncio.get_running_loop().time() < deadline:
        try:
            event = await asyncio.wait_for(sub.get(), 0.25)
        except asyncio.TimeoutError:
            continue
        if event is None:
            break
        if isinstance(event, pb.LogBatch):
            await stream.send_new(event.lines)
    await stream.history()


class _Stream:
    """The caller's position (the key of the last line sent) and its sends."""

    def __init__(self, svc, request: pb.LogsRequest, context, timeout: float):
        self.svc, self.request = svc, request
        self._write = Sender(context, request.id, timeout, what="logs", hint="")
        self.last: tuple[int, int] = (0, 0)

    async def history(self) -> None:
        """Every stored line after `last`, page by page."""
        while True:
            page = await self.svc.db(self.svc.store.read_logs, self.request.id, attempt=self.request.attempt,
                                     after=self.last)
            if not page:
                return
            await self.send([pb.LogLine(attempt=ln.attempt, index=ln.index, stream=ln.stream,
                                        wall_time=ln.wall_time, text=ln.text) for ln in page])
            if len(page) < store_logs.PAGE_LINES:
                return

    async def send_new(self, lines) -> None:
        attempt = self.request.attempt
        new = [ln for ln in lines if (ln.attempt, ln.index) > self.last and (not attempt or ln.attempt == attempt)]
        if new:
            await self.send(new)

    async def send(self, lines: list[pb.LogLine]) -> None:
        """In messages of at most ~MESSAGE_BYTES of text; `last` moves past real lines."""
        start, size = 0, 0
        for i, ln in enumerate(lines):
            size += len(ln.text) + 32
            if size >= MESSAGE_BYTES or i == len(lines) - 1:
                await self._write(pb.LogBatch(experiment_id=self.request.id, lines=lines[start:i + 1]))
                start, size = i + 1, 0
        real = [ln for ln in lines if ln.index > 0]
        if real:
            self.last = max(self.last, (real[-1].attempt, real[-1].index))
