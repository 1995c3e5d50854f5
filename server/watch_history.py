"""Watch's history phase and its sends, with bounded memory per watcher.

History is read from the store in pages of consecutive steps (never the whole run at
once: 20 watchers of a 1,000,000-point run once held ~40 MB each), and every send has a
deadline, so a client that stops reading costs the server one page and one message
until the deadline ends its stream.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import grpc

from trainctl.server.guard import rate_limited
from trainctl.server.store import entities as e

# Points per history page (a page is a step range; its width adapts so a page holds
# about this many points, whatever number of names a step carries).
PAGE_POINTS = 4000
FIRST_PAGE_STEPS = 256
MAX_PAGE_STEPS = 1 << 40   # a gap in the steps is crossed in a few widening reads
# A send that has not gone out after this long means the client stopped reading.
SEND_TIMEOUT_S = 60.0


async def history_pages(db: Callable, store, experiment_id: int, first: int, last: int,
                        page_points: int | None = None) -> AsyncIterator[list[e.MetricRow]]:
    """The stored rows with first <= step <= last, in step order, one page at a time."""
    page_points = page_points or PAGE_POINTS
    start, width = first, FIRST_PAGE_STEPS
    while start <= last:
        end = min(last, start + width - 1)
        rows = await db(store.metric_rows, experiment_id, from_step=start, to_step=end)
        if rows:
            yield rows
        points = sum(len(r.values) for r in rows)
        # Next width: aim at page_points, grow at most 8x a page (a sparse stretch or a
        # gap is crossed in a few reads), never below one step.
        width = min(MAX_PAGE_STEPS, width * 8 if points == 0 else
                    max(1, min(width * 8, width * page_points // points)))
        start = end + 1


class ClientStalled(Exception):
    """The client took no message for the send deadline (message: what to tell it)."""


class Sender:
    """`await send(event)`: context.write with a deadline; raises ClientStalled when the
    client has not taken a message for `timeout` seconds.

    Raised, not answered here: the RESOURCE_EXHAUSTED status can only go out after the
    message already queued (HTTP/2 keeps order), i.e. when the client reads or leaves, so
    Watch first unwinds (unsubscribes, drops its history page) and then answers."""

    def __init__(self, context, experiment_id: int, timeout: float = SEND_TIMEOUT_S, *,
                 what: str = "watch", hint: str = "; reconnect with from_step"):
        self.context, self.experiment_id, self.timeout = context, experiment_id, timeout
        self.what, self.hint = what, hint

    async def __call__(self, event) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.context.write(event)
        except TimeoutError:
            raise ClientStalled(f"{self.what} of experiment {self.experiment_id}: the client read nothing for "
                                f"{self.timeout:g} s{self.hint}") from None


async def answer_stalled(context, key: object, message: str) -> None:
    """End a stream whose client stalled with RESOURCE_EXHAUSTED `message` (logged,
    rate-limited by `key`); it goes out once the client reads or leaves. Call it outside
    the `except ClientStalled`, so the traceback (and the page it holds) is gone."""
    rate_limited(logging.INFO, key, "%s", message)
    try:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
    except grpc.aio.AbortError:
        raise
    except (asyncio.CancelledError, Exception):  # the call ended first (client gone, server stopping)
        return
