"""Watch with bounded memory, in-process (real server, real store, real gRPC loopback):
history is read in pages of steps, then live rows follow with no gap and no duplicate,
and a client that stops reading is cut off by the send deadline and released."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tests.conftest import digits_spec
from tests.scripted import in_loop, running_server
from trainctl.server import watch_history
from trainctl.server.store import open_store
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.wire import struct_from_dict

NAMES = ("acc", "loss")


def _rows(steps, names=NAMES):
    return [(s, s // 100, time.time(), [float(s)] * len(names)) for s in steps]


def test_history_pages_cover_every_row_once_across_gaps(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'pages.db'}") as store:
        x = store.create_experiment("pages", {"name": "pages"})
        a = store.claim_next("w", free_gpus=0)
        steps = [*range(0, 1000), *range(5000, 5003), *range(10 ** 12, 10 ** 12 + 10)]
        store.add_metrics(x.id, a.attempt, "STEP", NAMES, _rows(steps))
        store.add_metrics(x.id, a.attempt, "EPOCH", ["val_acc"], [(s, s // 100, 0.0, [0.5]) for s in (99, 199, 5002)])
        calls = []

        async def db(fn, *args, **kw):
            out = fn(*args, **kw)
            calls.append(sum(len(r.values) for r in out))
            return out

        async def collect():
            return [rows async for rows in watch_history.history_pages(db, store, x.id, 0, 10 ** 12 + 9,
                                                                        page_points=200)]

        pages = asyncio.run(collect())
        got = [(r.scope, r.step) for page in pages for r in page]
        want = [(r.scope, r.step) for r in store.metric_rows(x.id)]
        assert got == want  # every row once, in order, STEP before EPOCH at a step
        assert max(calls) <= 8 * 200  # a page is bounded, whatever the history holds
        assert len(calls) < 60  # the 10**12 gap is crossed in a few widening reads


async def _submit(srv, name: str) -> int:
    x = await srv.experiments.Submit(pb.SubmitRequest(spec=struct_from_dict(digits_spec(name))))
    return x.id


async def _acked(srv, w, seq: int) -> None:
    """Until the server acknowledged every batch up to `seq` (acks are cumulative)."""
    await srv.until(lambda: max((b.seq for b in w.of_kind("batch_ack")), default=0) >= seq, timeout=30,
                    what=f"batch {seq} acknowledged")


@in_loop
async def test_watch_pages_history_then_live_without_gap_or_duplicate(tmp_path, monkeypatch):
    monkeypatch.setattr(watch_history, "PAGE_POINTS", 100)
    monkeypatch.setattr(watch_history, "FIRST_PAGE_STEPS", 16)
    async with running_server(tmp_path, lease_timeout=30.0) as srv:
        exp = await _submit(srv, "paged")
        w = await srv.worker("w1")
        a = await w.expect("assignment")
        w.state(exp, a.attempt, pb.RUNNING)
        seq = 0
        for s0 in range(0, 3000, 100):
            seq += 1
            w.metrics(exp, a.attempt, seq, range(s0, s0 + 100), names=NAMES)
        await _acked(srv, w, seq)
        page_points: list[int] = []
        real = srv.store.metric_rows

        def recorded(*args, **kw):
            rows = real(*args, **kw)
            page_points.append(sum(len(r.values) for r in rows))
            return rows
        srv.store.metric_rows = recorded

        events: list = []

        async def watch():
            async for ev in srv.experiments.Watch(pb.WatchRequest(id=exp, from_step=100)):
                events.append(ev)
        reader = asyncio.create_task(watch())
        # Live rows arrive while history is being paged; the run ends during the watch.
        for s0 in range(3000, 6000, 100):
            seq += 1
            w.metrics(exp, a.attempt, seq, range(s0, s0 + 100), names=NAMES)
            if s0 % 1000 == 0:
                seq += 1
                w.metrics(exp, a.attempt, seq, [s0 - 1], scope=pb.EPOCH, names=("val_acc",), epoch=s0 // 1000)
            await asyncio.sleep(0.005)
        await _acked(srv, w, seq)
        w.state(exp, a.attempt, pb.COMPLETED)
        await asyncio.wait_for(reader, 60)

        steps = [r.step for ev in events if ev.WhichOneof("event") == "metrics" and ev.metrics.scope == pb.STEP
                 for r in ev.metrics.rows]
        assert steps == list(range(100, 6000))  # no gap, no duplicate, in order
        epochs = [r.step for ev in events if ev.WhichOneof("event") == "metrics" and ev.metrics.scope == pb.EPOCH
                  for r in ev.metrics.rows]
        assert epochs == [2999, 3999, 4999]
        assert events[-1].experiment.state == pb.COMPLETED
        assert len(page_points) > 5 and max(page_points) <= 8 * 100, page_points  # paged, each page bounded


@in_loop
async def test_a_watcher_that_stops_reading_is_cut_off_and_released(tmp_path):
    async with running_server(tmp_path, lease_timeout=30.0) as srv:
        srv.server.experiments.watch_send_timeout = 1.0
        exp = await _submit(srv, "stalled")
        a = await srv.db(srv.store.claim_next, "direct", 0)
        assert a.id == exp
        for s0 in range(0, 20_000, 2000):  # ~1 MB of history: more than HTTP/2 lets through unread
            await srv.db(srv.store.add_metrics, exp, a.attempt, "STEP", ["a", "b", "c", "d"],
                         [(s, 0, 0.0, [1.0, 2.0, 3.0, 4.0]) for s in range(s0, s0 + 2000)])
        # Its own channel without BDP probing: the HTTP/2 window stays at 64 KiB.
        async with grpc.aio.insecure_channel(srv.channel._channel.target.decode(),
                                             options=[("grpc.http2.bdp_probe", 0)]) as ch:
            call = pb_grpc.ExperimentsStub(ch).Watch(pb.WatchRequest(id=exp))
            await srv.until(lambda: srv.live.hub.subscriber_count() == 1, what="the watch to subscribe")
            t0 = time.monotonic()
            await srv.until(lambda: srv.live.hub.subscriber_count() == 0, timeout=20, what="the stalled watch to end")
            assert time.monotonic() - t0 < 15
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "read nothing for 1 s" in info.value.details()
