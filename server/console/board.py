"""The runs table's live state: one hub listener for every console.

The hub calls `on_event` for every event it publishes (state changes, metric batches,
resolved commands) on the server's event loop. The board keeps, per experiment, the
newest experiment message and the last value of each metric, and bumps a version; a
runs-page stream wakes at most every `interval` and sends the rows changed since the
version it last sent. So twenty open consoles cost one dict update per batch plus
twenty small sends a second, not twenty copies of every batch, and nothing here reads
the database (the first page comes from one List, then only the hub).
"""
from __future__ import annotations

import asyncio

from trainctl.server.console import jsonify
from trainctl.v1 import trainctl_pb2 as pb

# Metric columns the table shows; others are ignored here (the run page shows all).
SHOWN = ("lr", "loss", "train_loss", "acc", "train_acc", "val_top1", "val_loss")
MAX_ROWS = 10_000  # experiments remembered; the oldest are dropped (the list reloads them)


class Board:
    def __init__(self):
        self.version = 0
        self._rows: dict[int, dict] = {}     # id -> {"x": experiment json, "m": metrics, "v": version}
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ hub side
    def on_event(self, experiment_id: int, event: pb.WatchEvent) -> None:
        which = event.WhichOneof("event")
        if which == "metrics":
            b = event.metrics
            if not b.rows:
                return
            last = b.rows[-1]
            row = self._row(experiment_id)
            m = row["m"]
            for name, value in zip(b.names, last.values):
                if name in SHOWN and value == value:
                    m[name] = value
            if b.scope == pb.STEP:
                m["step"], m["epoch"] = last.step, last.epoch
            else:
                m["epoch_done"] = last.epoch
            m["wall_time"] = last.wall_time
        elif which == "experiment":
            self._row(experiment_id)["x"] = jsonify.experiment(event.experiment)
        else:
            return
        self._bump(experiment_id)

    def _row(self, experiment_id: int) -> dict:
        row = self._rows.get(experiment_id)
        if row is None:
            if len(self._rows) >= MAX_ROWS:
                del self._rows[min(self._rows)]
            row = self._rows[experiment_id] = {"x": None, "m": {}, "v": 0}
        return row

    def _bump(self, experiment_id: int) -> None:
        self.version += 1
        self._rows[experiment_id]["v"] = self.version
        self._changed.set()

    # ------------------------------------------------------------------ reader side
    def metrics_of(self, experiment_id: int) -> dict:
        row = self._rows.get(experiment_id)
        return dict(row["m"]) if row else {}

    def changed_since(self, version: int) -> list[dict]:
        """[{"id", "x" (experiment json or None), "m" (latest metrics)}] changed after `version`."""
        return [{"id": i, "x": r["x"], "m": r["m"]} for i, r in self._rows.items() if r["v"] > version]

    async def wait_change(self, version: int, timeout: float) -> None:
        if self.version > version:
            return
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
