"""Per-step metrics without a per-step host sync.

Loss and correct counts stay on the device as tensors; every `sync_every` steps they
are stacked and copied out in one transfer, then handed to the sink row by row. On
CPU `sync_every=1` (a copy is free there, and watchers see each step at once).
The rows are the same whatever `sync_every` is; only when they reach the sink differs.

Under DDP (`reduce` set, `world_size` ranks) each drain sums the pending loss and
correct tensors over ranks with one all_reduce, so rows and epoch sums are global: the
loss is the mean over all ranks' samples (the mean of the ranks' mean losses, their
batches being equal), samples_per_sec counts every rank. Every rank drains at the same steps.

A non-finite loss is therefore seen up to `sync_every` steps late; the step number it
reports is still the exact step, and non-finite steps are kept out of the epoch sums
(so a run with `on_nonfinite: skip` still reports a meaningful train_loss).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from trainctl.workers.engine.context import STEP, MetricsSink


@dataclass
class EpochSums:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    first_nonfinite_step: Optional[int] = None
    nonfinite_steps: int = 0


@dataclass
class StepStats:
    sink: MetricsSink
    sync_every: int = 1
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # sum over ranks
    world_size: int = 1
    _pending: list = field(default_factory=list)
    _sums: EpochSums = field(default_factory=EpochSums)
    _last_time: float = field(default_factory=time.perf_counter)

    def add(self, step: int, epoch: int, lr: float, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        """`loss` is the step's mean loss over its `n` samples, `correct` their hit count."""
        now = time.perf_counter()
        self._pending.append((step, epoch, lr, loss, correct, n, now - self._last_time))
        self._last_time = now
        if len(self._pending) >= self.sync_every:
            self._drain()

    @property
    def first_nonfinite_step(self) -> Optional[int]:
        """Of the steps drained so far this epoch."""
        return self._sums.first_nonfinite_step

    def flush(self) -> EpochSums:
        """Drain pending steps and return (and reset) the epoch's running sums."""
        self._drain()
        sums, self._sums = self._sums, EpochSums()
        self._last_time = time.perf_counter()
        return sums

    def _drain(self) -> None:
        if not self._pending:
            return
        if self.reduce is None and self._pending[0][3].device.type == "cpu":
            # No device to sync with: a scalar read is cheaper than stacking.
            losses = [float(p[3]) for p in self._pending]
            corrects = [int(p[4]) for p in self._pending]
        else:
            losses = torch.stack([p[3] for p in self._pending]).float()
            corrects = torch.stack([p[4] for p in self._pending])
            if self.reduce is not None:  # one collective for the whole drain: sums over ranks
                summed = self.reduce(torch.stack([losses.double(), corrects.double()]))
                losses, corrects = summed[0] / self.world_size, summed[1].round().long()
            losses, corrects = losses.cpu().tolist(), corrects.cpu().tolist()
        for (step, epoch, lr, _, _, n, dt), loss, correct in zip(self._pending, losses, corrects):
            n *= self.world_size
            if math.isfinite(loss):
                self._sums.loss_sum += loss * n
                self._sums.correct += int(correct)
                self._sums.seen += n
            else:
                self._sums.nonfinite_steps += 1
                if self._sums.first_nonfinite_step is None:
                    self._sums.first_nonfinite_step = step
            self.sink.log(STEP, step, epoch, {"lr": lr, "loss": loss, "acc": correct / n,
                                              "samples_per_sec": n / dt if dt > 0 else math.nan})
        self._pending.clear()
