"""History over real gRPC: GetMetrics with max_points on a long run answers from the
store's min/max rollup, with the same points the store computes, the extremes kept,
and total_points counting every stored point."""
from __future__ import annotations

import math
import time

from trainctl.server.store import open_store
from trainctl.v1 import trainctl_pb2 as pb

STEPS = 100_000


def test_downsampled_get_metrics_matches_store_and_keeps_extremes(server_only):
    with open_store(f"sqlite:///{server_only.db_path}") as store:
        x = store.create_experiment("history", {"model": {"name": "resnet10t"}})
        claimed = store.claim_next("history-writer", free_gpus=0)
        assert claimed.id == x.id
        rows = [(s, s // 1000, 0.0, [math.sin(s / 997) + (9.0 if s == 71_717 else 0.0), 1.0 / (1 + s)])
                for s in range(STEPS)]
        for i in range(0, STEPS, 1000):
            store.add_metrics(x.id, claimed.attempt, "STEP", ["loss", "lr"], rows[i:i + 1000])
        expected, total = store.get_metrics_downsampled(x.id, 500)

    with server_only.client() as c:
        t0 = time.perf_counter()
        resp = c._call("GetMetrics", pb.GetMetricsRequest(id=x.id, max_points=500))
        elapsed = time.perf_counter() - t0
        assert resp.total_points == total == 2 * STEPS
        got = {s.name: s for s in resp.series}
        assert list(got) == ["loss", "lr"]
        for want in expected:
            s = got[want.name]
            assert (list(s.steps), list(s.epochs), list(s.values)) == (want.steps, want.epochs, want.values)
            assert len(s.steps) <= 500 and s.steps[0] == 0 and s.steps[-1] == STEPS - 1
        loss = got["loss"]
        assert max(loss.values) == rows[71_717][3][0]  # the spike
        assert min(loss.values) == min(r[3][0] for r in rows)
        assert elapsed < 5  # generous: a loaded CI box; bench/history.py measures it properly

        # No max_points: every point, in step order.
        full = c.metrics(x.id, names=["lr"])["STEP/lr"]
        assert full["step"] == list(range(STEPS)) and full["value"] == [r[3][1] for r in rows]
