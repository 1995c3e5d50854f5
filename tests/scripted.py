"""In-process harness for the server core: the real server (`create_server`) on a temp
SQLite file, in this process's event loop, and scripted worker sessions that speak the
Workers stream over real gRPC loopback, message by message.

    @in_loop
    async def test_x(tmp_path):
        async with running_server(tmp_path, lease_timeout=1.0) as srv:
            w = await srv.worker("w1")
            a = await w.expect("assignment")
            w.send(heartbeat=pb.Heartbeat(experiment_id=a.experiment_id, attempt=a.attempt))

No training and no subprocess: each test takes about its lease timeouts, not minutes.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import grpc

from trainctl.server.app import ServerConfig, create_server
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc


def in_loop(fn):
    """Run an async test function in a fresh event loop (no pytest-asyncio needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


class ScriptedWorker:
    """One Connect stream: `send(**WorkerMessage fields)`, `expect(kind)`."""

    def __init__(self, channel: grpc.aio.Channel, worker_id: str, current: pb.Heartbeat | None = None):
        self.worker_id = worker_id
        self._out: asyncio.Queue = asyncio.Queue()
        self.received: list[pb.ServerMessage] = []
        self._new = asyncio.Event()
        hello = pb.Hello(worker_id=worker_id, hostname="scripted", current=current)
        self.call = pb_grpc.WorkersStub(channel).Connect(self._messages(hello))
        self._reader = asyncio.create_task(self._read())

    async def _messages(self, hello):
        yield pb.WorkerMessage(hello=hello)
        while (msg := await self._out.get()) is not None:
            yield msg

    async def _read(self):
        try:
            async for msg in self.call:
                self.received.append(msg)
                self._new.set()
        except grpc.aio.AioRpcError:
            pass
        finally:
            self._new.set()

    def send(self, **fields) -> None:
        self._out.put_nowait(pb.WorkerMessage(**fields))

    def metrics(self, experiment_id: int, attempt: int, seq: int, steps, *, scope=pb.STEP, names=("loss",),
                value=1.0, epoch=0) -> None:
        rows = [pb.MetricRow(step=s, epoch=epoch, wall_time=time.time(), values=[value] * len(names)) for s in steps]
        self.send(metrics=pb.MetricBatch(experiment_id=experiment_id, attempt=attempt, seq=seq, scope=scope,
                                         names=list(names), rows=rows))

    def heartbeat(self, experiment_id: int = 0, attempt: int = 0, **kw) -> None:
        self.send(heartbeat=pb.Heartbeat(experiment_id=experiment_id, attempt=attempt, **kw))

    def state(self, experiment_id: int, attempt: int, state: int, message: str = "") -> None:
        self.send(state=pb.StateUpdate(experiment_id=experiment_id, attempt=attempt, state=state, message=message))

    def of_kind(self, kind: str) -> list:
        return [getattr(m, kind) for m in self.received if m.WhichOneof("msg") == kind]

    async def expect(self, kind: str, timeout: float = 10.0, *, index: int = 0):
        """The index-th message of `kind` received (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.of_kind(kind)
            if len(got) > index:
                return got[index]
            left = deadline - time.monotonic()
            if left <= 0 or self._reader.done():
                raise AssertionError(f"{self.worker_id}: no {kind} #{index} in {timeout} s; got "
                                     f"{[m.WhichOneof('msg') for m in self.received]}")
            self._new.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    async def close(self) -> None:
        self._out.put_nowait(None)
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._reader


class RunningServer:
    def __init__(self, server, port: int):
        self.server = server
        self.live = server.live
        self.store = server.live.store
        self.dispatcher = server.dispatcher
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.experiments = pb_grpc.ExperimentsStub(self.channel)
        self.workers: list[ScriptedWorker] = []

    async def worker(self, worker_id: str, current: pb.Heartbeat | None = None) -> ScriptedWorker:
        w = ScriptedWorker(self.channel, worker_id, current)
        self.workers.append(w)
        await w.expect("welcome")
        return w

    async def db(self, fn, *args, **kwargs):
        """A store call off the loop (a direct call would block the server under test)."""
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))

    async def until(self, predicate, timeout: float = 10.0, what: str = "condition"):
        """Poll an async or plain predicate until it returns a truthy value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_server(tmp_path, *, lease_timeout: float = 1.0, heartbeat_interval: float = 0.2):
    config = ServerConfig(db_url=f"sqlite:///{tmp_path / 'trainctl.db'}", lease_timeout=lease_timeout,
                          heartbeat_interval=heartbeat_interval, grace=0.5)
    server, port = create_server("127.0.0.1:0", config)
    await server.start()
    srv = RunningServer(server, port)
    try:
        yield srv
    finally:
        for w in srv.workers:
            await w.close()
        await srv.channel.close()
        await server.stop(0.5)
