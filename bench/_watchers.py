"""Subprocess for bench/fanout.py: N asyncio watchers (raw grpc.aio Watch streams) of one
experiment plus optionally one stalled watcher that never reads until the run is over.
Prints one JSON line: per-watcher order check, lags, the stalled watcher's fate."""
from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc

from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

FINAL = (pb.COMPLETED, pb.FAILED, pb.CANCELLED)


async def watch(stub, exp_id: int, lags: list, out: dict) -> None:
    steps = []
    try:
        async for ev in stub.Watch(pb.WatchRequest(id=exp_id)):
            now = time.time()
            if ev.WhichOneof("event") == "metrics" and ev.metrics.scope == pb.STEP:
                for r in ev.metrics.rows:
                    steps.append(r.step)
                    lags.append(now - r.wall_time)
            elif ev.WhichOneof("event") == "experiment" and ev.experiment.state in FINAL:
                break
        out["status"] = "OK"
    except grpc.aio.AioRpcError as exc:
        out["status"] = exc.code().name
    out["n"] = len(steps)
    out["in_order"] = steps == list(range(len(steps)))


async def main(address: str, exp_id: int, n: int, stalled: bool) -> None:
    channels = [grpc.aio.insecure_channel(address) for _ in range(min(n, 10))]
    stubs = [pb_grpc.ExperimentsStub(c) for c in channels]
    lags: list = []
    outs = [dict() for _ in range(n)]
    tasks = [asyncio.create_task(watch(stubs[i % len(stubs)], exp_id, lags, outs[i])) for i in range(n)]
    stall = None
    if stalled:
        # Its own channel, so HTTP/2 flow control stops only this stream.
        # No BDP probing: the HTTP/2 window stays at its 64 KiB default instead of growing
        # to swallow the whole run, so the server really sees a reader that does not read.
        sch = grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
        stall = pb_grpc.ExperimentsStub(sch).Watch(pb.WatchRequest(id=exp_id))
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.gather(*tasks)
    res = {"watchers": outs, "lag_ms": sorted(x * 1e3 for x in lags)}
    if stall is not None:
        got, code = 0, "OK"
        try:
            async for ev in stall:
                got += 1
        except grpc.aio.AioRpcError as exc:
            code, res["stalled_details"] = exc.code().name, exc.details()
        res["stalled_events"], res["stalled_status"] = got, code
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"))
