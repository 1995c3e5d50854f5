"""The SDK's session against the real server, in-process (fast): an Attach whose reply
is lost is retried with its attach key and makes one run, not two; `finish()` counts
the final state delivered only once the server has stored it."""
from __future__ import annotations

import asyncio
import contextlib
import time
import types

import grpc

from tests.scripted import RunningServer, in_loop
from trainctl.server.app import ServerConfig, create_server
from trainctl.attach import run as run_mod
from trainctl.attach import session as session_mod
from trainctl.server.experiments_service import ExperimentsService
from trainctl.server.workers_service import WorkersService
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as real_grpc


class _Lost(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "reply lost (test)"


def _losing_first_attach_reply(monkeypatch) -> list:
    """The first Attach reaches the server and succeeds there; its reply is lost."""
    calls: list = []

    class Stub:
        def __init__(self, channel):
            self._stub = real_grpc.ExperimentsStub(channel)

        def __getattr__(self, name):
            return getattr(self._stub, name)

        def Attach(self, request, **kw):
            resp = self._stub.Attach(request, **kw)
            calls.append(resp.experiment.id)
            if len(calls) == 1:
                raise _Lost()
            return resp

    fake = types.SimpleNamespace(ExperimentsStub=Stub, WorkersStub=real_grpc.WorkersStub)
    monkeypatch.setattr(session_mod, "pb_grpc", fake)
    return calls


@contextlib.asynccontextmanager
async def _serve(tmp_path, lease_timeout: float):
    cfg = ServerConfig(db_url=f"sqlite:///{tmp_path / 'trainctl.db'}", lease_timeout=lease_timeout,
                       heartbeat_interval=0.2, grace=0.5)
    server, port = create_server("127.0.0.1:0", cfg)
    await server.start()
    srv = RunningServer(server, port)
    try:
        yield srv, f"127.0.0.1:{port}"
    finally:
        await srv.channel.close()
        await server.stop(0.5)


async def _until(pred, timeout=20.0):
    for _ in range(int(timeout / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


@in_loop
async def test_an_attach_whose_reply_was_lost_makes_one_run_and_every_row_arrives(tmp_path, monkeypatch):
    """Old SDK: the retry made a second experiment (and the rows went to it)."""
    calls = _losing_first_attach_reply(monkeypatch)
    async with _serve(tmp_path, lease_timeout=5.0) as (srv, address):
        r = run_mod.Run(name="lost-reply", server=address, spill_dir=str(tmp_path))
        for i in range(50):
            r.step()
            r.log(loss=float(i))
        await _until(lambda: r.id)
        assert await asyncio.to_thread(r.finish, timeout=20) == []
        assert len(calls) == 2 and calls[0] == calls[1] == r.id  # retried: the same run
        xs = await srv.db(srv.store.list_experiments)
        assert [x.id for x in xs] == [r.id]  # one run, not two
        assert xs[0].state == "COMPLETED"
        assert await srv.db(srv.store.delivered, r.id) == (50, 0)  # every row


@in_loop
async def test_finish_is_confirmed_by_the_servers_final_ack_without_a_get(tmp_path, monkeypatch):
    """The final state's BatchAck.final is the confirmation: finish() neither polls Get
    (a run token may not be allowed to) nor waits the server's ack delay."""
    async def no_get(self, request, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, "Get is down in this test")

    monkeypatch.setattr(ExperimentsService, "Get", no_get)
    async with _serve(tmp_path, lease_timeout=30.0) as (srv, address):
        r = run_mod.Run(name="final-ack", server=address, spill_dir=str(tmp_path))
        for i in range(50):
            r.step()
            r.log(loss=float(i))
        await _until(lambda: r.id)
        t0 = time.monotonic()
        assert await asyncio.to_thread(r.finish, timeout=20) == []
        assert time.monotonic() - t0 < 10  # (not a timing target: without the ack it waits out the 20 s)
        x = await srv.db(srv.store.get_experiment, r.id)
        assert x.state == "COMPLETED" and await srv.db(srv.store.count_metrics, r.id) == 50


@in_loop
async def test_finish_waits_for_the_server_to_store_the_final_state(tmp_path, monkeypatch):
    """The server takes the final state off the stream but never stores it: the old
    finish() counted it delivered once it had left the outbox; now it is reported."""
    original = WorkersService._on_state

    async def drop_final(self, session, st):
        if st.state in (pb.ASSIGNED, pb.RUNNING):
            await original(self, session, st)

    monkeypatch.setattr(WorkersService, "_on_state", drop_final)
    async with _serve(tmp_path, lease_timeout=30.0) as (srv, address):
        r = run_mod.Run(name="unconfirmed", server=address, spill_dir=str(tmp_path))
        r.step()
        r.log(loss=1.0)
        await _until(lambda: r.id)
        missing = await asyncio.to_thread(r.finish, timeout=3)
        assert missing and "final state were not delivered" in missing[0], missing
        assert (await srv.db(srv.store.get_experiment, r.id)).state in ("ASSIGNED", "RUNNING")
        monkeypatch.setattr(WorkersService, "_on_state", original)
        ok = run_mod.Run(name="confirmed", server=address, spill_dir=str(tmp_path))
        ok.step()
        await _until(lambda: ok.id)
        assert await asyncio.to_thread(ok.finish, timeout=20) == []
        assert (await srv.db(srv.store.get_experiment, ok.id)).state == "COMPLETED"
