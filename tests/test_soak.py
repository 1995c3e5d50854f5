"""Soak: 8 experiments on 4 workers, 20 watchers, one control call a second, for a
bounded time on loopback. No error, no lost or duplicated point, flat server memory."""
from __future__ import annotations

import os
import random
import sqlite3
import threading
import time

import pytest

from tests.conftest import Cluster
from trainctl.client import Client, TrainctlError

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("TRAINCTL_SOAK_SECONDS", "30"))  # longer soaks: set it


def _spec(i: int) -> dict:
    return {
        "name": f"soak-{i}",
        "model": {"name": "test_resnet"},
        "data": {"dataset": "synthetic", "batch_size": 16, "img_size": 16, "num_samples": 256, "num_classes": 4},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "step", "step_size": 1, "gamma": 0.9},
        "train": {"epochs": 1000, "seed": i, "checkpoint_every": 0},
    }


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))


def test_soak(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        for i in range(4):
            cluster.add_worker(f"w{i}")
        with cluster.client() as c:
            ids = [c.submit(_spec(i)).id for i in range(8)]
        errors: list[str] = []
        seen: dict[int, list[list[int]]] = {i: [] for i in ids}
        stop = threading.Event()

        def watcher(exp_id: int) -> None:
            steps: list[int] = []
            seen[exp_id].append(steps)
            try:
                with Client(cluster.address) as wc:
                    for ev in wc.watch(exp_id):
                        if ev.kind == "step":
                            steps.append(ev.step)
            except Exception as exc:  # noqa: BLE001 - the test reports every failure
                errors.append(f"watch {exp_id}: {exc!r}")

        watchers = [threading.Thread(target=watcher, args=(ids[i % 8],), daemon=True) for i in range(20)]
        for t in watchers:
            t.start()

        controls = {"APPLIED": 0, "PENDING": 0, "refused": 0}

        def steer() -> None:
            rng = random.Random(0)
            with Client(cluster.address) as sc:
                while not stop.wait(1.0):
                    try:
                        r = sc.scale_lr(rng.choice(ids), rng.choice([0.9, 1.1]), wait=2.0)
                        controls[r.status] = controls.get(r.status, 0) + 1
                    except TrainctlError as exc:
                        if exc.code != "FAILED_PRECONDITION":
                            errors.append(f"control: {exc}")
                        controls["refused"] += 1

        steering = threading.Thread(target=steer, daemon=True)
        steering.start()
        time.sleep(min(10, SECONDS / 3))
        rss_start = _rss_kb(cluster.server.popen.pid)
        time.sleep(SECONDS - min(10, SECONDS / 3))
        rss_end = _rss_kb(cluster.server.popen.pid)
        stop.set()
        steering.join(10)
        with cluster.client() as c:
            for i in ids:
                try:
                    c.cancel(i, "soak over")
                except TrainctlError as exc:
                    assert exc.code == "FAILED_PRECONDITION", exc
            for t in watchers:
                t.join(30)
            states = {c.get(i).state for i in ids}

        assert not errors, errors
        assert states <= {"CANCELLED", "COMPLETED"}, states
        # half the experiments wait in the queue the whole time: their commands stay PENDING
        assert controls["APPLIED"] >= 1 and sum(controls.values()) >= SECONDS / 2, controls
        with sqlite3.connect(cluster.db_path) as db:
            for i in ids:
                stored = [s for (s,) in db.execute("SELECT step FROM metrics WHERE experiment_id=? AND scope='STEP' "
                                                   "AND name='loss' ORDER BY step", (i,))]
                assert stored == list(range(len(stored))), f"experiment {i}: gap or duplicate in the store"
                for steps in seen[i]:
                    # each watcher: strictly increasing, no gap, and only steps that were stored
                    assert steps == list(range(len(steps))), f"experiment {i}: a watcher saw a gap/duplicate"
                    assert len(steps) <= len(stored)
        started = [i for i in ids if seen[i] and max(map(len, seen[i])) > 0]
        assert len(started) >= 4, "fewer than 4 experiments ever trained"
        assert rss_end < rss_start * 1.5 + 30_000, f"server RSS grew from {rss_start} kB to {rss_end} kB"
        print(f"soak: controls {controls}, server RSS {rss_start} -> {rss_end} kB, "
              f"steps stored {[len(max(seen[i], key=len, default=[])) for i in ids]}")
    finally:
        cluster.stop()
