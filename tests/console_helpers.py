"""Helpers for the console tests: an in-process server with the console on, a scripted
worker speaking the real Workers stream over loopback gRPC, and small HTTP/SSE clients."""
from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from trainctl.server.app import ServerConfig, create_server
from trainctl.server.auth import Tokens
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc


class InProcServer:
    """create_server(...) with --http on a free port, in its own event-loop thread."""

    def __init__(self, tmp: Path, *, tokens: Tokens = Tokens(), **config):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        cfg = ServerConfig(db_url=f"sqlite:///{tmp / 'console.db'}", tokens=tokens, http="127.0.0.1:0",
                           heartbeat_interval=0.5, lease_timeout=30.0, grace=1.0, **config)

        async def make():
            server, port = create_server("127.0.0.1:0", cfg)
            await server.start()
            return server, port

        self.server, self.port = self.call(make())
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://127.0.0.1:{self.server.console.port}"

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class ScriptedWorker:
    """A worker that is a script: hello, then whatever the test sends, over real gRPC."""

    def __init__(self, address: str, worker_id: str = "scripted", token: str | None = None):
        self.channel = grpc.insecure_channel(address)
        stub = pb_grpc.WorkersStub(self.channel)
        self._out: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self._out.put(pb.WorkerMessage(hello=pb.Hello(
            worker_id=worker_id, hostname="test-host", version="test",
            devices=[pb.Device(kind="cpu", index=0, name="test cpu", memory_bytes=8 << 30)])))
        md = [("authorization", f"Bearer {token}")] if token else None
        self._stream = stub.Connect(iter(self._out.get, None), metadata=md)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.seq = 0

    def _read(self) -> None:
        try:
            for msg in self._stream:
                self.inbox.put(msg)
        except grpc.RpcError:
            pass

    def expect(self, kind: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind} from the server in {timeout} s")
            try:
                msg = self.inbox.get(timeout=left)
            except queue.Empty:
                continue
            if msg.WhichOneof("msg") == kind:
                return getattr(msg, kind)

    def send(self, **kw) -> None:
        self._out.put(pb.WorkerMessage(**kw))

    def take_run(self, timeout: float = 10.0) -> pb.Assignment:
        a = self.expect("assignment", timeout)
        self.send(state=pb.StateUpdate(experiment_id=a.experiment_id, attempt=a.attempt, state=pb.RUNNING))
        return a

    def steps(self, a: pb.Assignment, first: int, n: int, *, lr: float = 0.1, wall: float | None = None) -> None:
        self.seq += 1
        now = time.time() if wall is None else wall
        rows = [pb.MetricRow(step=s, epoch=0, wall_time=now, values=[lr, 2.0 / (s + 1)]) for s in range(first, first + n)]
        self.send(metrics=pb.MetricBatch(experiment_id=a.experiment_id, attempt=a.attempt, seq=self.seq,
                                         scope=pb.STEP, names=["lr", "loss"], rows=rows))

    def close(self) -> None:
        self._out.put(None)
        self.channel.close()


def http(url: str, body: dict | None = None, *, token: str | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, dict]:
    h = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("content-type", "application/json")
    if token:
        h["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=h, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class SseReader:
    """Reads an SSE endpoint in a thread; `messages` fills with the parsed data lines."""

    def __init__(self, url: str, token: str | None = None):
        self.messages: queue.Queue = queue.Queue()
        req = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"} if token else {})
        self.resp = urllib.request.urlopen(req, timeout=60)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for raw in self.resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    self.messages.put(json.loads(line[6:]))
        except Exception:
            pass
        self.messages.put(None)

    def until(self, pred, timeout: float = 10.0) -> list[dict]:
        """Messages read until one satisfies `pred` (included); TimeoutError otherwise."""
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if m is None:
                raise EOFError(f"stream ended; got {[x.get('t') for x in got]}")
            got.append(m)
            if pred(m):
                return got
        raise TimeoutError(f"condition not met in {timeout} s; got {[x.get('t') for x in got]}")

    def close(self) -> None:
        # Shut the socket first: close() alone waits on the reader thread's blocked read.
        try:
            self.resp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):
            pass
        self.resp.close()
