"""Synthetic workers for the benchmarks: raw `Workers.Connect` streams (grpc.aio) that
speak the real protocol (hello -> assignment -> RUNNING -> MetricBatch ... -> acks)
without training anything, so the server is the only thing measured."""
from __future__ import annotations

import asyncio
import random
import socket
import time

import grpc

from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

NAMES = ["acc", "loss", "lr", "samples_per_sec"]  # what a real step row carries


def build_batches(exp_id: int, attempt: int, first_step: int, n_rows: int, rows_per_batch: int,
                  names=NAMES, first_seq: int = 1) -> list[pb.WorkerMessage]:
    rnd = random.Random(exp_id)
    out = []
    seq = first_seq
    wall = time.time()
    for s0 in range(first_step, first_step + n_rows, rows_per_batch):
        b = pb.MetricBatch(experiment_id=exp_id, attempt=attempt, seq=seq, scope=pb.STEP, names=names)
        for step in range(s0, min(s0 + rows_per_batch, first_step + n_rows)):
            b.rows.add(step=step, epoch=step // 1000, wall_time=wall, values=[rnd.random() for _ in names])
        out.append(pb.WorkerMessage(metrics=b))
        seq += 1
    return out


class SynthWorker:
    def __init__(self, address: str, worker_id: str):
        self.address, self.worker_id = address, worker_id
        self.q: asyncio.Queue = asyncio.Queue()
        self.assignment: asyncio.Future = asyncio.get_running_loop().create_future()
        self.acked_seq = 0
        self._ack_waiters: list[tuple[int, asyncio.Future]] = []
        self.channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.WorkersStub(self.channel)

    async def _requests(self):
        while True:
            m = await self.q.get()
            if m is None:
                return
            yield m

    async def start(self) -> pb.Assignment:
        self.q.put_nowait(pb.WorkerMessage(hello=pb.Hello(
            worker_id=self.worker_id, hostname=socket.gethostname(), version="bench",
            devices=[pb.Device(kind="cpu", index=0, name="synthetic")])))
        self.call = self.stub.Connect(self._requests())
        self.reader = asyncio.create_task(self._read())
        a = await self.assignment
        self.exp_id, self.attempt = a.experiment_id, a.attempt
        self.q.put_nowait(pb.WorkerMessage(state=pb.StateUpdate(experiment_id=a.experiment_id, attempt=a.attempt,
                                                                state=pb.RUNNING)))
        return a

    async def _read(self) -> None:
        async for msg in self.call:
            kind = msg.WhichOneof("msg")
            if kind == "assignment" and not self.assignment.done():
                self.assignment.set_result(msg.assignment)
            elif kind == "batch_ack":
                self.acked_seq = max(self.acked_seq, msg.batch_ack.seq)
                keep = []
                for seq, fut in self._ack_waiters:
                    if seq <= self.acked_seq and not fut.done():
                        fut.set_result(time.perf_counter())
                    elif not fut.done():
                        keep.append((seq, fut))
                self._ack_waiters = keep
            elif kind == "cancel":
                raise RuntimeError(f"{self.worker_id}: server cancelled the run: {msg.cancel.reason}")

    def send(self, msg: pb.WorkerMessage) -> None:
        self.q.put_nowait(msg)

    async def send_acked(self, batches: list[pb.WorkerMessage]) -> None:
        """Send every batch, then wait until the server acked the last one."""
        for m in batches:
            self.send(m)
        await self.wait_acked(batches[-1].metrics.seq)

    def wait_acked(self, seq: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self.acked_seq >= seq:
            fut.set_result(time.perf_counter())
        else:
            self._ack_waiters.append((seq, fut))
        return fut

    async def finish(self, state=pb.COMPLETED) -> None:
        self.q.put_nowait(pb.WorkerMessage(state=pb.StateUpdate(experiment_id=self.exp_id, attempt=self.attempt,
                                                                state=state)))
        await asyncio.sleep(0.2)
        self.q.put_nowait(None)
        try:
            await asyncio.wait_for(self.reader, 5)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        await self.channel.close()


def tiny_spec(name: str) -> dict:
    return {"name": name, "model": {"name": "resnet10t"},
            "data": {"dataset": "synthetic", "batch_size": 8, "img_size": 16},
            "optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"name": "cosine"},
            "loss": {"name": "cross_entropy"}, "train": {"epochs": 1}}
