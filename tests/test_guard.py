"""The server's error boundary (server/guard.py), in-process over real gRPC loopback:
store outages are UNAVAILABLE with the store's message, unexpected errors INTERNAL with
one log line (the traceback once per raising site), undecodable bodies INVALID_ARGUMENT,
and a flood of them costs one log line per method per minute."""
from __future__ import annotations

import logging
import sqlite3

import grpc
import pytest

from tests.scripted import in_loop
from trainctl.server import guard
from trainctl.server.store.errors import NotFound, StoreUnavailable
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

LOCKED = StoreUnavailable("get_experiment", sqlite3.OperationalError("database is locked"))


class Faulty(pb_grpc.ExperimentsServicer, pb_grpc.WorkersServicer):
    async def Get(self, request, context):
        raise LOCKED

    async def List(self, request, context):
        raise RuntimeError("boom " + "x" * 10_000)

    async def Cancel(self, request, context):
        raise NotFound("experiment", request.id)  # a StoreError the service forgot to map: INTERNAL

    async def GetMetrics(self, request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, "experiment 5 not found")

    async def Watch(self, request, context):  # writes, then the store fails mid-stream
        await context.write(pb.WatchEvent(experiment=pb.Experiment(id=request.id)))
        raise LOCKED

    async def ListControls(self, request, context):
        return pb.ListControlsResponse()

    async def Connect(self, request_iterator, context):
        async for msg in request_iterator:
            yield pb.ServerMessage(welcome=pb.Welcome())


async def _serve():
    server = grpc.aio.server(interceptors=[guard.GuardInterceptor()])
    svc = Faulty()
    pb_grpc.add_ExperimentsServicer_to_server(svc, server)
    pb_grpc.add_WorkersServicer_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def fresh_rate_limit(monkeypatch):
    monkeypatch.setattr(guard, "rate_limited", guard.RateLimitedLog(guard.log))


async def _status(coro):
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@in_loop
async def test_store_outage_is_unavailable_with_the_store_message(caplog):
    server, address = await _serve()
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.ExperimentsStub(ch)
            code, details = await _status(stub.Get(pb.GetRequest(id=1)))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert details == "the database is unavailable (get_experiment: database is locked); try again"
            call = stub.Watch(pb.WatchRequest(id=3))
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for ev in call:
                    got.append(ev)
            assert [e.experiment.id for e in got] == [3] and info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)
    assert "Traceback" not in caplog.text


@in_loop
async def test_unexpected_errors_are_internal_with_one_traceback_per_site(caplog):
    caplog.set_level(logging.INFO, logger="trainctl.server.guard")
    server, address = await _serve()
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.ExperimentsStub(ch)
            for _ in range(30):
                code, details = await _status(stub.List(pb.ListRequest()))
                assert code == grpc.StatusCode.INTERNAL
                assert details == "internal error in List (RuntimeError); the server log has the details"
            code, details = await _status(stub.Cancel(pb.CancelRequest(id=4)))
            assert code == grpc.StatusCode.INTERNAL and "NotFound" in details
            # An abort of the service passes through untouched.
            assert await _status(stub.GetMetrics(pb.GetMetricsRequest(id=5))) == \
                (grpc.StatusCode.NOT_FOUND, "experiment 5 not found")
            assert (await _status(stub.ListControls(pb.ListControlsRequest())))[0] == grpc.StatusCode.OK
    finally:
        await server.stop(0)
    records = [r for r in caplog.records if r.name == "trainctl.server.guard"]
    assert caplog.text.count("Traceback") == 2  # List's site and Cancel's, once each
    assert len(records) == 2  # 29 more List failures inside the minute: not logged
    assert len(caplog.text) < 20_000  # the 10,000-character message is not repeated


@in_loop
async def test_undecodable_bodies_are_invalid_argument_for_every_shape(caplog):
    caplog.set_level(logging.INFO, logger="trainctl.server.guard")
    server, address = await _serve()
    junk = b"\x0a\xff\xff\xff\xff\x0f"  # a length-delimited field longer than the message
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            for _ in range(20):
                code, details = await _status(ch.unary_unary("/trainctl.v1.Experiments/Get")(junk))
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert details.startswith("request: not a valid trainctl.v1.GetRequest message")
            stream = ch.unary_stream("/trainctl.v1.Experiments/Watch")(junk)
            assert (await _status(stream.read()))[0] == grpc.StatusCode.INVALID_ARGUMENT
            bidi = ch.stream_stream("/trainctl.v1.Workers/Connect")()
            await bidi.write(pb.WorkerMessage(hello=pb.Hello(worker_id="w")).SerializeToString())
            assert pb.ServerMessage.FromString(await bidi.read()).WhichOneof("msg") == "welcome"
            await bidi.write(junk)
            assert (await _status(bidi.read()))[0] == grpc.StatusCode.INVALID_ARGUMENT
            assert "WorkerMessage" in (await bidi.details())
    finally:
        await server.stop(0)
    lines = [r.getMessage() for r in caplog.records if "bad request" in r.getMessage()]
    assert len(lines) == 3, lines  # Get (once for 20 calls), Watch, Connect
    assert "Traceback" not in caplog.text


def test_rate_limited_log_counts_what_it_held_back(caplog):
    caplog.set_level(logging.INFO)
    clock = [0.0]
    rl = guard.RateLimitedLog(logging.getLogger("t"), every=60)
    guard_time = guard.time.monotonic
    try:
        guard.time.monotonic = lambda: clock[0]
        assert rl(logging.INFO, "k", "first")
        for _ in range(5):
            assert not rl(logging.INFO, "k", "again")
        clock[0] = 61.0
        assert rl(logging.INFO, "k", "later")
    finally:
        guard.time.monotonic = guard_time
    assert [r.getMessage() for r in caplog.records] == [
        "first", "later (5 more like it in the last 60 s not logged)"]
