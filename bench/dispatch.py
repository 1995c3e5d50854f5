"""Dispatch: with an idle worker, Submit -> first step metric at the client.

    python bench/dispatch.py          # ~1 min: resnet10t, 5 submissions after a warm-up

A real `trainctl worker` waits idle (after one untimed warm-up run, so torch/timm are
imported); each round submits a spec and watches it at once. Reported per round:
submit RPC, -> ASSIGNED / RUNNING events at the client, -> first STEP row at the client.
Model build time (Trainer construction: data + timm model + optimizer + schedule, what the
worker does between RUNNING and its first step) is measured separately for the same spec
in a separate process with the same thread count, and the first optimizer step alone
likewise. Target: submit -> first step <= 1 s + build time (+ that first step's own time).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import PRESETS, Cluster, DEFAULT_THREADS, machine, median, spec, table  # noqa: E402
from overhead import TrainHost  # noqa: E402


def one(client, sd: dict) -> dict:
    t0 = time.time()
    x = client.submit(sd)
    t_sub = time.time()
    marks: dict = {}
    done = threading.Event()

    def run():
        for ev in client.watch(x.id):
            now = time.time()
            if ev.kind == "experiment":
                marks.setdefault(ev.experiment.state, now)
                if ev.experiment.is_final:
                    break
            elif ev.kind == "step" and "step" not in marks:
                marks["step"] = now
                marks["step_wall"] = ev.wall_time
        done.set()

    threading.Thread(target=run, daemon=True).start()
    done.wait(300)
    return {"submit": t_sub - t0, **{k: v - t0 for k, v in marks.items() if isinstance(v, float)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="resnet10t")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    sd = spec("dispatch", steps=3, **PRESETS[args.preset])
    host = TrainHost(args.threads)
    try:
        host.run("build", sd)  # warm imports
        builds = [host.run("build", sd)["build_s"] for _ in range(3)]
        first_steps = []
        for _ in range(3):
            t = host.run("bare", spec("first", steps=2, **PRESETS[args.preset]))["times"]
            first_steps.append(t[1] - t[0])  # one optimizer step (data + fwd + bwd + step)
    finally:
        host.close()
    build, step1 = median(builds), median(first_steps)
    with Cluster() as cluster:
        cluster.add_worker("bench-w0", threads=args.threads)
        client = cluster.client()
        one(client, spec("warm", steps=3, **PRESETS[args.preset]))
        rounds = [one(client, sd) for _ in range(args.rounds)]
        client.close()
    rows = []
    for i, r in enumerate(rounds):
        total = r.get("step", float("nan"))
        rows.append([i + 1, r["submit"] * 1e3, r.get("ASSIGNED", float("nan")) * 1e3,
                     r.get("RUNNING", float("nan")) * 1e3, total * 1e3,
                     (total - build - step1) * 1e3])
    print()
    table(["round", "submit RPC ms", "-> ASSIGNED ms", "-> RUNNING ms", "-> first step at client ms",
           "minus build & 1st step ms"], rows,
          title=f"Dispatch latency ({args.preset}); build = {build * 1e3:.0f} ms, first step = {step1 * 1e3:.0f} ms "
                "(medians, measured separately)")
    over = median([r[-1] for r in rows])
    print(f"\nmedian submit -> first step: {median([r[4] for r in rows]):.0f} ms = build {build * 1e3:.0f} ms + "
          f"first step {step1 * 1e3:.0f} ms + {over:.0f} ms of trainctl; target <= 1000 ms + build: "
          f"{'MET' if over <= 1000 else 'gap'}")


if __name__ == "__main__":
    main()
