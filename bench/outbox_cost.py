"""Diagnostic (not a target): what the worker's outbox costs the training thread, with
no network and no server, in one process.

    python bench/outbox_cost.py         # ~1.5 min

A training thread runs the small model (test_vit 16px b8, 1 torch thread) and logs one
STEP row per step (4 values, as the worker does). Arms, interleaved per round:

  none    no logging at all
  outbox  RunSink -> Outbox; a sender thread consumes Outbox.stream() as gRPC would
          (serialises every message) and acks each batch at once
  sleep   the same, but the sender's linger sleeps LINGER_S and then drains the queue,
          instead of waking on every queued row (the `_linger` change proposed in
          RESULTS.md, applied here by monkeypatching)

Prints steps/s and process CPU ms per step (all threads) per arm, and the ratios.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import median, table  # noqa: E402


def make_step():
    import timm
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=16, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        opt.step()
        return loss

    return step


def run_arm(step, arm: str, steps: int) -> tuple[float, float]:
    from trainctl.v1 import trainctl_pb2 as pb
    from trainctl.workers import shipper

    sink = sender = stop = None
    if arm != "none":
        outbox = shipper.Outbox()
        if arm == "sleep":
            def linger(self, first):
                if isinstance(first, shipper._Row):
                    time.sleep(shipper.LINGER_S)  # the rest is drained by _with_waiting_rows
                return [first]
            outbox._linger = linger.__get__(outbox)
        sink = shipper.RunSink(outbox, 1, 1)
        stop = threading.Event()

        def consume():
            for msg in outbox.stream(pb.WorkerMessage(hello=pb.Hello()), pb.Heartbeat, 5.0, stop):
                msg.SerializeToString()
                if msg.WhichOneof("msg") == "metrics":
                    outbox.acked(1, 1, msg.metrics.seq)

        sender = threading.Thread(target=consume, daemon=True)
        sender.start()
    for _ in range(20):  # warm-up
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        loss = step()
        if sink is not None:
            sink.log("STEP", i, 0, {"lr": 0.01, "loss": float(loss), "acc": 0.5, "throughput": 1000.0})
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if stop is not None:
        stop.set()
        sender.join(10)
    return steps / wall, cpu / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    step = make_step()
    arms = ["none", "outbox", "sleep"]
    res: dict[str, list] = {a: [] for a in arms}
    for r in range(args.rounds):
        for a in arms:
            res[a].append(run_arm(step, a, args.steps))
            print(f"  round {r + 1} {a:6s} {res[a][-1][0]:7.1f} steps/s  {res[a][-1][1]:.3f} CPU ms/step", flush=True)
    base = median([s for s, _ in res["none"]])
    table(["arm", "steps/s (median)", "vs none", "CPU ms/step (median)"],
          [[a, median([s for s, _ in res[a]]), median([s for s, _ in res[a]]) / base,
            median([c for _, c in res[a]])] for a in arms],
          title="Outbox cost in-process (small model, 1 torch thread)")


if __name__ == "__main__":
    main()
