"""History: `metrics ID --max-points 2000` on a 1,000,000-point run, and Watch with
from_step crossing from stored history into live rows.

    python bench/history.py           # ~1 min

1. A synthetic worker (real protocol, bench/_synth.py) stores 250,000 steps x 4 names =
   1,000,000 points. Then GetMetrics(max_points=2000) is timed through the SDK (median of
   5) and through the CLI (`trainctl metrics ID --max-points 2000 --json`, a new process:
   interpreter start included). Every series must come back with <= 2000 points, its
   first/last step and its global min and max kept. Target <= 1 s.
2. While the synthetic worker keeps streaming new steps (50 rows every 20 ms), a client
   watches with from_step = 240,000: it must receive every step from 240,000 to the last
   one sent exactly once, in order (history, then live, no gap, no duplicate).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import Cluster, machine, median, table  # noqa: E402
from _synth import NAMES, SynthWorker, build_batches, tiny_spec  # noqa: E402


def watch_thread(client, exp_id: int, from_step: int, out: dict) -> threading.Thread:
    def run():
        steps, t0 = [], time.perf_counter()
        try:
            for ev in client.watch(exp_id, from_step=from_step):
                if ev.kind == "step":
                    steps.append(ev.step)
                    if len(steps) == 1:
                        out["first_s"] = time.perf_counter() - t0
                elif ev.kind == "experiment" and ev.experiment.is_final:
                    break
        except Exception as exc:
            out["error"] = exc
        out["steps"] = steps

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


async def amain(args) -> None:
    rows = args.points // len(NAMES)
    with Cluster() as cluster:
        client = cluster.client()
        x = client.submit(tiny_spec("history"))
        w = SynthWorker(cluster.address, "synth-history")
        await w.start()
        batches = build_batches(w.exp_id, w.attempt, 0, rows, 1000)
        t0 = time.perf_counter()
        await w.send_acked(batches)
        load_s = time.perf_counter() - t0
        n_stored = sum(len(s["step"]) for s in client.metrics(x.id, names=["loss"]).values()) * len(NAMES)

        # 1. downsampled read
        sdk = []
        for _ in range(5):
            t0 = time.perf_counter()
            series = await asyncio.to_thread(client.metrics, x.id, max_points=args.max_points)
            sdk.append(time.perf_counter() - t0)
        ok = all(len(s["step"]) <= args.max_points and s["step"][0] == 0 and s["step"][-1] == rows - 1
                 for s in series.values()) and len(series) == len(NAMES)
        full = await asyncio.to_thread(client.metrics, x.id, names=["loss"])
        ds = series["STEP/loss"]["value"]
        extremes = min(ds) == min(full["STEP/loss"]["value"]) and max(ds) == max(full["STEP/loss"]["value"])
        cli = []
        for _ in range(2):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "trainctl.client.cli", "metrics", str(x.id), "--max-points",
                                str(args.max_points), "--json", "--server", cluster.address],
                               capture_output=True, text=True)
            cli.append(time.perf_counter() - t0)
            assert p.returncode == 0, p.stderr
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import trainctl.client.cli"], check=True)
        cli_import = time.perf_counter() - t0

        # 2. watch from_step across history -> live
        from_step = rows - args.live_back
        out: dict = {}
        th = watch_thread(client, x.id, from_step, out)
        live_rows, step, seq = args.live_rows, rows, batches[-1].metrics.seq + 1
        end = rows + live_rows
        while step < end:
            b = build_batches(w.exp_id, w.attempt, step, min(50, end - step), 50, first_seq=seq)[0]
            w.send(b)
            seq += 1
            step += 50
            await asyncio.sleep(0.02)
        await w.wait_acked(seq - 1)
        await w.finish()  # COMPLETED: the watch ends after the last row
        await asyncio.to_thread(th.join, 60)
        got = out.get("steps", [])
        expected = list(range(from_step, end))
        dups = len(got) - len(set(got))
        missing = len(set(expected) - set(got))
        client.close()

    print()
    table(["points stored", "load s", "max_points", "SDK median s", "SDK max s", "CLI s (process)",
           "CLI import s", "series ok", "min/max kept", "target <= 1 s"],
          [[n_stored, load_s, args.max_points, median(sdk), max(sdk), median(cli), cli_import,
            "yes" if ok else "NO", "yes" if extremes else "NO", "MET" if median(sdk) <= 1 else "gap"]],
          title="GetMetrics on a 1,000,000-point run, downsampled")
    print()
    table(["from_step", "history rows", "live rows", "received", "in order", "duplicates", "missing",
           "first row s", "target"],
          [[from_step, args.live_back, live_rows, len(got), "yes" if got == sorted(got) else "NO", dups, missing,
            out.get("first_s", float("nan")), "MET" if got == expected else f"gap {out.get('error', '')}"]],
          title="Watch(from_step) while the run streams: history then live")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--max-points", type=int, default=2000)
    ap.add_argument("--live-back", type=int, default=10_000, help="history rows the watch starts behind")
    ap.add_argument("--live-rows", type=int, default=3000, help="rows streamed live during the watch")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
