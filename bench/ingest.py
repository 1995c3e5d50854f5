"""Ingestion: metric points persisted per second into SQLite, 1 / 4 / 16 concurrent workers.

    python bench/ingest.py            # ~1 min: 400,000 points per configuration

Synthetic workers (bench/_synth.py, grpc.aio, one process, messages pre-built before
the clock starts) speak the real protocol to a real `trainctl server` process: hello ->
the server's Assignment for an experiment submitted beforehand -> RUNNING -> MetricBatch
messages as fast as flow control lets them -> the server's BatchAck for the last one (it
acks only after the batch is committed). A point = step x metric name x value (4 names
per row, like a real step row). Time = first batch queued -> last batch acked, all
workers. Afterwards the database is counted directly (sqlite3) and must equal what was
sent. Target >= 100,000 points/s in every configuration.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import Cluster, cpu_s, machine, table  # noqa: E402
from _synth import NAMES, SynthWorker, build_batches, tiny_spec  # noqa: E402


async def one_config(cluster: Cluster, n_workers: int, points: int, rows_per_batch: int, tag: str) -> dict:
    client = cluster.client()
    ids = [client.submit(tiny_spec(f"ingest-{tag}-{i}")).id for i in range(n_workers)]
    client.close()
    workers = [SynthWorker(cluster.address, f"synth-{tag}-{i}") for i in range(n_workers)]
    assignments = await asyncio.gather(*(w.start() for w in workers))
    assert sorted(a.experiment_id for a in assignments) == sorted(ids), "assigned experiments differ"
    rows_each = points // (n_workers * len(NAMES))
    batches = [build_batches(w.exp_id, w.attempt, 0, rows_each, rows_per_batch) for w in workers]
    sent = {w.exp_id: rows_each * len(NAMES) for w in workers}
    await asyncio.sleep(0.3)  # RUNNING persisted, server idle
    c0 = cpu_s(cluster.server.pid)
    t0 = time.perf_counter()
    waits = []
    for w, bs in zip(workers, batches):
        for m in bs:
            w.send(m)
        waits.append(w.wait_acked(bs[-1].metrics.seq))
    ends = await asyncio.gather(*waits)
    elapsed = max(ends) - t0
    server_cpu = cpu_s(cluster.server.pid) - c0
    await asyncio.gather(*(w.finish() for w in workers))
    with sqlite3.connect(f"file:{cluster.db_path}?mode=ro", uri=True) as db:
        counted = {i: db.execute("SELECT count(*) FROM metrics WHERE experiment_id=?", (i,)).fetchone()[0]
                   for i in sent}
    total = sum(sent.values())
    return {"workers": n_workers, "points": total, "batches": sum(len(b) for b in batches),
            "points_per_batch": rows_per_batch * len(NAMES), "seconds": elapsed, "rate": total / elapsed,
            "server_cpu": server_cpu / elapsed, "db_ok": counted == sent, "counted": sum(counted.values())}


async def amain(args) -> list[dict]:
    with Cluster() as cluster:
        out = []
        for n in args.workers:
            r = await one_config(cluster, n, args.points, args.rows, f"w{n}")
            print(f"  {n} workers: {r['rate']:,.0f} points/s, db count {'==' if r['db_ok'] else '!='} sent",
                  flush=True)
            out.append(r)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=400_000, help="points per configuration")
    ap.add_argument("--rows", type=int, default=500, help="rows per MetricBatch (x4 names = points)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    print(f"machine: {machine()}")
    res = asyncio.run(amain(args))
    print()
    table(["workers", "points", "batches", "points/batch", "seconds", "points/s", "server CPU (cores)",
           "DB count == sent", "target >= 100k/s"],
          [[r["workers"], r["points"], r["batches"], r["points_per_batch"], r["seconds"], r["rate"], r["server_cpu"],
            "yes" if r["db_ok"] else f"NO ({r['counted']})", "MET" if r["rate"] >= 100_000 and r["db_ok"] else "gap"]
           for r in res],
          title="Ingestion into SQLite over real gRPC")


if __name__ == "__main__":
    main()
