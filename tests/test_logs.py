"""Run output (issue 13, item 4), in-process and fast: the real server and store on a
temp SQLite file, scripted worker streams and `Experiments.Logs` calls over real gRPC
loopback (tests/scripted.py).

Storage and numbering, a resend stored once and acknowledged, the per-experiment bound
(oldest dropped, a SYSTEM marker), long lines cut, fencing (a worker that does not hold
the lease has its LogBatch refused), tail/attempt filters, and `follow`: history then
live with no gap and no duplicate, ending at the final state, catching up from the store
when the follower falls behind the live queue."""
from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from trainctl.server.store import logs as store_logs
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

from tests.scripted import in_loop, running_server

pytest_plugins = ["tests.pg"]  # pg_url: a throwaway PostgreSQL database


async def _assigned(srv, worker_id="w1"):
    x = await srv.db(srv.store.create_experiment, "x", {"name": "x"})
    srv.dispatcher.kick()
    w = await srv.worker(worker_id)
    a = await w.expect("assignment")
    assert a.experiment_id == x.id
    return x, w, a


def _send_lines(w, x_id: int, attempt: int, indexes, *, stream=pb.STDOUT, text="line {i}") -> None:
    w.send(logs=pb.LogBatch(experiment_id=x_id, attempt=attempt, lines=[
        pb.LogLine(attempt=attempt, index=i, stream=stream, wall_time=time.time(), text=text.format(i=i))
        for i in indexes]))


async def _read(srv, x_id: int, **kw) -> list[pb.LogLine]:
    out = []
    async for batch in srv.experiments.Logs(pb.LogsRequest(id=x_id, **kw)):
        out.extend(batch.lines)
    return out


def _keys(lines) -> list[tuple[int, int]]:
    return [(ln.attempt, ln.index) for ln in lines]


@in_loop
async def test_lines_are_stored_once_and_acknowledged(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, w, a = await _assigned(srv)
        _send_lines(w, x.id, a.attempt, range(1, 6))
        ack = await w.expect("log_ack")
        assert (ack.experiment_id, ack.attempt, ack.index) == (x.id, a.attempt, 5)
        # A resend after a reconnect overlaps what is stored: each line is kept once, the
        # stored text is the first one's, and the ack covers the whole batch.
        _send_lines(w, x.id, a.attempt, range(3, 9), text="resent {i}")
        assert (await w.expect("log_ack", index=1)).index == 8
        lines = await _read(srv, x.id)
        assert _keys(lines) == [(a.attempt, i) for i in range(1, 9)]
        assert [ln.text for ln in lines[:5]] == [f"line {i}" for i in range(1, 6)]
        assert [ln.text for ln in lines[5:]] == [f"resent {i}" for i in range(6, 9)]
        assert await srv.db(srv.store.count_logs, x.id) == 8


@in_loop
async def test_bound_drops_the_oldest_lines_with_a_marker(tmp_path, monkeypatch):
    monkeypatch.setattr(store_logs, "MAX_LINES", 10)
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, w, a = await _assigned(srv)
        _send_lines(w, x.id, a.attempt, range(1, 16))
        _send_lines(w, x.id, a.attempt, range(16, 26))
        assert (await w.expect("log_ack", index=1)).index == 25
        assert await srv.db(srv.store.count_logs, x.id) == 10
        lines = await _read(srv, x.id)
        marker, rest = lines[0], lines[1:]
        assert (marker.stream, marker.index) == (pb.SYSTEM, 0)
        assert "15 earlier lines dropped" in marker.text
        assert [ln.index for ln in rest] == list(range(16, 26))
        # A late resend of a dropped line is not stored again (nor counted twice).
        _send_lines(w, x.id, a.attempt, [3, 4])
        await w.expect("log_ack", index=2)
        state = await srv.db(srv.store.log_state, x.id)
        assert (state["stored"], state["dropped"]) == (10, 15)
        # --tail within what is stored: no marker; the last N lines.
        assert [ln.index for ln in await _read(srv, x.id, tail=3)] == [23, 24, 25]


@in_loop
async def test_a_long_line_is_cut_with_a_marker(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, w, a = await _assigned(srv)
        long = "é" * 30_000  # 60,000 bytes of UTF-8
        _send_lines(w, x.id, a.attempt, [1], text=long)
        await w.expect("log_ack")
        (line,) = await _read(srv, x.id)
        assert len(line.text.encode()) <= store_logs.MAX_TEXT_BYTES
        assert line.text.startswith("éé") and line.text.endswith("[... line cut: 60000 bytes in all]")


@in_loop
async def test_lines_from_a_session_without_the_lease_are_refused(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, owner, a = await _assigned(srv, "owner")
        _send_lines(owner, x.id, a.attempt, [1, 2])
        await owner.expect("log_ack")
        thief = await srv.worker("thief")
        _send_lines(thief, x.id, a.attempt, [2, 3, 4], text="forged {i}")
        stop = await thief.expect("cancel")
        assert (stop.experiment_id, stop.attempt, stop.kind) == (x.id, a.attempt, pb.STOP_FENCED)
        # The owner, naming a stale attempt, is refused too.
        _send_lines(owner, x.id, a.attempt + 1, [1], text="stale")
        stale = await owner.expect("cancel")
        assert (stale.attempt, stale.kind) == (a.attempt + 1, pb.STOP_FENCED)
        await asyncio.sleep(0.2)
        assert not thief.of_kind("log_ack")
        assert [ln.text for ln in await _read(srv, x.id)] == ["line 1", "line 2"]


@in_loop
async def test_attempts_tail_and_bad_requests(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, w1, a = await _assigned(srv)
        _send_lines(w1, x.id, a.attempt, range(1, 4), stream=pb.STDERR)
        await w1.expect("log_ack")
        w1.state(x.id, a.attempt, pb.QUEUED, "worker stopping")  # hand-back: attempt 2 elsewhere
        await srv.until(lambda: not srv.dispatcher.leases, what="hand-back")
        w2 = await srv.worker("w2")
        a2 = await w2.expect("assignment")
        _send_lines(w2, x.id, a2.attempt, range(1, 3))
        await w2.expect("log_ack")
        assert _keys(await _read(srv, x.id)) == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
        assert _keys(await _read(srv, x.id, attempt=1)) == [(1, 1), (1, 2), (1, 3)]
        assert _keys(await _read(srv, x.id, tail=3)) == [(1, 3), (2, 1), (2, 2)]
        assert _keys(await _read(srv, x.id, tail=2, attempt=1)) == [(1, 2), (1, 3)]
        assert {ln.stream for ln in await _read(srv, x.id, attempt=1)} == {pb.STDERR}
        for req, field in ((pb.LogsRequest(id=x.id, tail=-1), "tail"), (pb.LogsRequest(id=x.id, attempt=-2), "attempt")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _read(srv, req.id, tail=req.tail, attempt=req.attempt)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _read(srv, 999)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@in_loop
async def test_follow_history_then_live_until_the_run_ends(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, w, a = await _assigned(srv)
        w.state(x.id, a.attempt, pb.RUNNING)
        _send_lines(w, x.id, a.attempt, range(1, 4))
        await w.expect("log_ack")
        got: list[pb.LogLine] = []
        follower = asyncio.create_task(_collect(srv, x.id, got))
        await srv.until(lambda: len(got) >= 3, what="history")
        _send_lines(w, x.id, a.attempt, range(3, 7))  # overlaps: a resend
        _send_lines(w, x.id, a.attempt, range(7, 9))
        await srv.until(lambda: len(got) >= 8, what="live lines")
        assert not follower.done()  # the run is still RUNNING: the follower waits
        _send_lines(w, x.id, a.attempt, [9], stream=pb.STDERR, text="last words")
        w.state(x.id, a.attempt, pb.FAILED, "exit code 1")
        await asyncio.wait_for(follower, 10)  # ends at the final state
        assert _keys(got) == [(1, i) for i in range(1, 10)]
        assert got[-1].text == "last words"
        # Following a run that already ended: its stored lines, then the end.
        assert len(await asyncio.wait_for(_read(srv, x.id, follow=True), 10)) == 9


@in_loop
async def test_a_follower_that_falls_behind_catches_up_from_the_store(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        hub = srv.live.log_hub
        hub.queue_size = 2  # its live queue overflows at once
        cut_off = []
        real_cut_off = hub._cut_off
        hub._cut_off = lambda sub: (cut_off.append(sub), real_cut_off(sub))
        x, w, a = await _assigned(srv)
        w.state(x.id, a.attempt, pb.RUNNING)
        # Without BDP probing the client's HTTP/2 window stays ~64 KB: a reader that does
        # not read holds the server's writes at once.
        address = srv.channel._channel.target.decode()  # the harness keeps no address of its own
        channel = grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
        call = pb_grpc.ExperimentsStub(channel).Logs(pb.LogsRequest(id=x.id, follow=True))
        await srv.until(lambda: hub.subscriber_count() == 1, what="subscribed")
        # Not reading: ~4 MB of lines fill HTTP/2's window, the server's write waits and
        # its queue overflows while 100 more batches arrive.
        text = "x" * 8000 + " {i}"
        for n in range(100):
            _send_lines(w, x.id, a.attempt, range(5 * n + 1, 5 * n + 6), text=text)
        await w.expect("log_ack", index=99, timeout=20)
        w.state(x.id, a.attempt, pb.COMPLETED)
        got = []
        async for batch in call:
            got.extend(batch.lines)
        await channel.close()
        assert cut_off  # the live queue did overflow; nothing was lost all the same
        assert _keys(got) == [(1, i) for i in range(1, 501)]


async def _collect(srv, x_id: int, out: list) -> None:
    async for batch in srv.experiments.Logs(pb.LogsRequest(id=x_id, follow=True)):
        out.extend(batch.lines)


@in_loop
async def test_cli_logs_and_get_of_a_failed_run(tmp_path, capsys):
    from trainctl.client import cli

    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        address = srv.channel._channel.target.decode()
        x, w, a = await _assigned(srv)
        _send_lines(w, x.id, a.attempt, range(1, 16), stream=pb.STDERR, text="err {i}")
        _send_lines(w, x.id, a.attempt, [16], text="[red]out {i}")  # not markup: printed as it is
        await w.expect("log_ack", index=1)
        w.state(x.id, a.attempt, pb.FAILED, "exit code 3")
        await srv.until(lambda: srv.store.get_experiment(x.id).state == "FAILED", what="FAILED")

        async def run(*argv):
            capsys.readouterr()
            rc = await asyncio.get_running_loop().run_in_executor(None, cli.main, [*argv, "--server", address])
            assert rc == 0
            return capsys.readouterr().out

        out = await run("get", str(x.id))
        shown = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("err ")]
        assert shown == [f"err {i}" for i in range(6, 16)]  # the last 10 stderr lines
        assert "exit code 3" in out
        assert (await run("logs", str(x.id))).splitlines() == [f"err {i}" for i in range(1, 16)] + ["[red]out 16"]
        objs = [json.loads(line) for line in (await run("logs", str(x.id), "--json", "--tail", "2")).splitlines()]
        assert [(o["attempt"], o["index"], o["stream"], o["text"]) for o in objs] == \
            [(1, 15, "STDERR", "err 15"), (1, 16, "STDOUT", "[red]out 16")]
        got = json.loads(await run("get", str(x.id), "--json"))
        assert got["last_lines"] == [f"err {i}" for i in range(6, 16)]


@in_loop
async def test_a_follower_of_a_cancelled_run_gets_the_workers_last_lines(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, w, a = await _assigned(srv)
        w.state(x.id, a.attempt, pb.RUNNING)
        got: list[pb.LogLine] = []
        follower = asyncio.create_task(_collect(srv, x.id, got))
        _send_lines(w, x.id, a.attempt, [1])
        await srv.until(lambda: len(got) == 1, what="line 1")
        await srv.experiments.Cancel(pb.CancelRequest(id=x.id, reason="enough"))
        await w.expect("cancel")
        await asyncio.sleep(0.5)
        # CANCELLED already, but the worker still holds the lease while it stops the command.
        assert not follower.done()
        _send_lines(w, x.id, a.attempt, [2], stream=pb.SYSTEM, text="stopping: SIGTERM")
        w.state(x.id, a.attempt, pb.CANCELLED, "enough")
        await asyncio.wait_for(follower, 10)
        assert [ln.text for ln in got] == ["line 1", "stopping: SIGTERM"]


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_store_dedupes_bounds_and_pages_on_both_databases(dialect, tmp_path, request):
    from trainctl.server.store import open_store
    from trainctl.server.store.entities import LogLine
    from trainctl.server.store.errors import StaleAttempt

    url = f"sqlite:///{tmp_path / 't.db'}" if dialect == "sqlite" else request.getfixturevalue("pg_url")
    store = open_store(url)
    try:
        x = store.create_experiment("x", {"name": "x"})
        a = store.claim_next("w1", free_gpus=0).attempt

        def lines(rng, text="l{i}"):
            return [LogLine(a, i, pb.STDOUT, 1.0, text.format(i=i)) for i in rng]

        assert [ln.index for ln in store.add_logs(x.id, a, lines(range(1, 8)), max_lines=5)] == [3, 4, 5, 6, 7]
        assert store.add_logs(x.id, a, lines(range(5, 8), "again{i}"), max_lines=5) == []  # stored: ignored
        assert store.add_logs(x.id, a, lines([1, 2]), max_lines=5) == []  # dropped before: not again
        new = store.add_logs(x.id, a, lines(range(6, 10)), max_lines=5)
        assert [ln.index for ln in new] == [8, 9]
        assert store.log_state(x.id) == {"stored": 5, "dropped": 4, "floor": (a, 4)}
        assert [(ln.index, ln.text) for ln in store.read_logs(x.id)] == [(i, f"l{i}") for i in range(5, 10)]
        assert [ln.index for ln in store.read_logs(x.id, after=store.log_tail_key(x.id, 2))] == [8, 9]
        assert [ln.index for ln in store.read_logs(x.id, after=(a, 6), limit=2)] == [7, 8]
        with pytest.raises(StaleAttempt):
            store.add_logs(x.id, a + 1, lines([10]))
    finally:
        store.close()
