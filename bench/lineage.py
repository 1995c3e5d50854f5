"""Lineage bound at assignment: `store.delivered(id)` on a 1,000,000-point run.

    python bench/lineage.py           # ~20 s (most of it storing the points)

Every assignment carries delivered_steps / delivered_epochs (the stored STEP-row and
EPOCH-row prefixes), so the call must stay cheap on long runs. A run of 250,000 steps x
4 names (1,000,000 points) plus 250 epoch rows is stored on a SQLite file, with one step
missing near the end (so the answer is not simply "everything"); delivered() is timed
(median of 5) next to the naive read that scans every stored step of the run.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from trainctl.server.store import open_store  # noqa: E402

NAMES = ["acc", "loss", "lr", "samples_per_sec"]
STEPS, SPE, GAP = 250_000, 1_000, 249_500


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/lineage.db")
        x = store.create_experiment("bench", {})
        attempt = store.claim_next("w", 0).attempt
        t0 = time.perf_counter()
        for s0 in range(0, STEPS, 5_000):
            rows = [(s, s // SPE, 0.0, [0.5] * len(NAMES)) for s in range(s0, min(s0 + 5_000, STEPS)) if s != GAP]
            store.add_metrics(x.id, attempt, "STEP", NAMES, rows)
        store.add_metrics(x.id, attempt, "EPOCH", ["val_top1"], [((e + 1) * SPE, e, 0.0, [0.5])
                                                                 for e in range(STEPS // SPE)])
        print(f"stored {store.count_metrics(x.id):,} points in {time.perf_counter() - t0:.1f} s")

        def timed(fn) -> tuple[float, object]:
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                out = fn()
                runs.append(time.perf_counter() - t)
            return statistics.median(runs), out

        fast, got = timed(lambda: store.delivered(x.id))
        assert got == (GAP, STEPS // SPE), got

        def naive():
            with store._engine.connect() as conn:
                steps = {r[0] for r in conn.exec_driver_sql(
                    "SELECT DISTINCT step FROM metrics WHERE experiment_id = ? AND scope = 'STEP'", (x.id,))}
            s = 0
            while s in steps:
                s += 1
            return s

        slow, n = timed(naive)
        assert n == GAP
        print(f"delivered() -> {got}: {fast * 1e3:.1f} ms (median of 5); full scan: {slow * 1e3:.0f} ms; "
              f"ratio {slow / fast:.0f}x")
        store.close()


if __name__ == "__main__":
    main()
