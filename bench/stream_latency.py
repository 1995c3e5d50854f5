"""Stream latency: step end on the worker -> the row at a watching client.

    python bench/stream_latency.py            # ~1 min: small model, 2000 steps, 1 watcher

A real `trainctl worker` process trains; a real `trainctl server` (SQLite) relays; this
process watches. Each STEP row carries the wall_time the worker stamped when the step's
values were handed to its Outbox (right after the optimizer step); latency = receive time
at the client - wall_time (same machine, same clock). Target p50 <= 30 ms, p99 <= 100 ms.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import PRESETS, Cluster, DEFAULT_THREADS, machine, pct, spec, table  # noqa: E402
from overhead import rate, run_worker_arm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with Cluster() as cluster:
        cluster.add_worker("bench-w0", threads=args.threads)
        client = cluster.client()
        run_worker_arm(client, spec("warm", steps=5, **PRESETS[args.preset]))
        out = run_worker_arm(client, spec("stream-latency", steps=args.steps, **PRESETS[args.preset]))
        lat = out["lat_ms"][10:]
        p50, p99 = pct(lat, 50), pct(lat, 99)
        print()
        table(["preset", "rows", "steps/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "target p50<=30, p99<=100"],
              [[args.preset, len(lat), rate(out["times"], 10), p50, pct(lat, 90), p99, max(lat),
                "MET" if p50 <= 30 and p99 <= 100 else "gap"]],
              title="Stream latency: worker step end -> row at a watching client")


if __name__ == "__main__":
    main()
