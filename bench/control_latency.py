"""Control latency: `set_lr` round trip at the client while a run trains at ~100 steps/s.

    python bench/control_latency.py           # ~1 min: 200 commands, one after another

Client.set_lr (Control RPC, waits for the worker's ack) -> server persists the command
and pushes it on the worker's stream -> the loop applies it at the next step boundary ->
ack -> server resolves the record -> reply. Every reply must say APPLIED with an
applied_step. Target: p99 <= one step time + 20 ms (step time = median gap between
consecutive step rows during the commands).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import PRESETS, Cluster, DEFAULT_THREADS, machine, median, pct, spec, table  # noqa: E402
from overhead import Watcher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commands", type=int, default=200)
    ap.add_argument("--gap-ms", type=float, default=20.0, help="pause between commands")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with Cluster() as cluster:
        cluster.add_worker("bench-w0", threads=args.threads)
        client = cluster.client()
        x = client.submit(spec("control-latency", steps=1_000_000 // 8, **PRESETS[args.preset]))
        w = Watcher(client, x.id)
        w.start()
        while len(w.rows) < 50:  # training is under way
            time.sleep(0.1)
            if not w.is_alive():
                raise RuntimeError(f"run ended early: {w.error or w.final}")
        lat, bad, parts = [], [], []
        t_start = time.time()
        for i in range(args.commands):
            lr = 0.05 + 0.0001 * i
            t0, w0 = time.perf_counter(), time.time()
            r = client.set_lr(x.id, lr, wait=10)
            lat.append((time.perf_counter() - t0) * 1e3)
            w1 = time.time()
            if r.requested_at and r.applied_at:
                parts.append(((r.requested_at - w0) * 1e3, (r.applied_at - r.requested_at) * 1e3,
                              (w1 - r.applied_at) * 1e3))
            if r.status != "APPLIED" or r.applied_step is None or abs(r.new_value - lr) > 1e-12:
                bad.append(r)
            time.sleep(args.gap_ms / 1e3)
        t_end = time.time()
        client.cancel(x.id, "benchmark done")
        w.join(30)
        during = [r[1] for r in w.rows if t_start <= r[1] <= t_end]
        gaps = [(b - a) * 1e3 for a, b in zip(during, during[1:])]
        step_ms = median(gaps)
        p50, p99 = pct(lat, 50), pct(lat, 99)
        print()
        table(["commands", "not APPLIED", "steps/s", "step ms (median)", "p50 ms", "p90 ms", "p99 ms", "max ms",
               "bound = step + 20 ms", "target"],
              [[len(lat), len(bad), 1e3 / step_ms, step_ms, p50, pct(lat, 90), p99, max(lat), step_ms + 20,
                "MET" if p99 <= step_ms + 20 and not bad else "gap"]],
              title="Control latency: set_lr acknowledged (applied) at the client")
        print()
        table(["segment", "p50 ms", "p99 ms"],
              [[name, pct([p[i] for p in parts], 50), pct([p[i] for p in parts], 99)] for i, name in enumerate(
                  ["client send -> server requested_at (RPC in, Get, spec check)",
                   "requested_at -> applied_at (store, push, worker applies at step, ack, store)",
                   "applied_at -> client has the reply"])],
              title="Where the time goes (server clock = client clock, same machine)")
        if bad:
            print("first bad reply:", bad[0])


if __name__ == "__main__":
    main()
