"""Cycle bookkeeping shared by timm's cosine, tanh and poly schedules."""
from __future__ import annotations

import math
from typing import Optional

from pydantic import Field

from .base import CommonParams, NoiseParams, Schedule


class CycleParams(CommonParams, NoiseParams):
    t_initial: Optional[float] = Field(
        None, gt=0, description="first cycle length in epochs; default: the run's epochs (minus the warmup if warmup_prefix)"
    )
    min_lr: float = Field(0.0, ge=0)
    cycle_mul: float = Field(1.0, gt=0)
    cycle_decay: float = Field(1.0, gt=0, le=1)
    cycle_limit: int = Field(1, ge=1)


class CyclicSchedule(Schedule):
    """timm's restart cycles: cycle i has length t_initial * cycle_mul**i and peak
    base_lr * cycle_decay**i; after cycle_limit cycles the LR stays at min_lr."""

    decay_param = "cycle_decay"

    def __init__(self, params, **kw) -> None:
        super().__init__(params, **kw)
        t0 = params.t_initial
        if t0 is None:
            t0 = self.epochs - (params.warmup_epochs if params.warmup_prefix else 0.0)
            if t0 <= 0:
                raise ValueError(f"t_initial defaults to epochs - warmup_epochs, which is {t0} here; set t_initial")
        self.t_initial = float(t0)

    def cycle(self, t: float) -> tuple[int, float, float]:
        """(cycle index, cycle length, time into the cycle), with timm's arithmetic."""
        mul, t0 = self.params.cycle_mul, self.t_initial
        if mul != 1:
            i = math.floor(math.log(1 - t / t0 * (1 - mul), mul))
            return i, mul**i * t0, t - (1 - mul**i) / (1 - mul) * t0
        i = t // t0
        return int(i), t0, t - t0 * i

    def decays_at(self, t: float) -> float:
        return self.cycle(t)[0]

    def _decay_ahead(self, step: int, last: int) -> str:
        # Cycle i starts with peak base_lr * decays of cycles 1..i; cycles from
        # cycle_limit on sit at min_lr, so only restarts before that limit are decays.
        limit = self.params.cycle_limit
        n = self.decay_count(step)
        if min(self.decay_count(last), limit - 1) > n:
            return ""
        if limit == 1:
            return (f"{self.name} has a single cycle (cycle_limit 1): no restart follows, so cycle_decay "
                    "never acts; cycle_decay only scales the peaks of later cycles")
        if n >= limit - 1:
            return (f"{self.name} is in its last cycle (cycle {n + 1} of cycle_limit {limit}): no restart "
                    "follows, so cycle_decay would change nothing")
        return (f"{self.name}'s next restart (cycle {n + 2}) would start after the run's last step ({last}): "
                "cycle_decay would change nothing")

    def curve(self, t: float) -> float:
        i, t_i, t_curr = self.cycle(t)
        if i >= self.params.cycle_limit:
            return self.params.min_lr
        return self.shape(self.base_lr * self.decay_multiplier(i), t_curr, t_i)

    def shape(self, lr_max: float, t_curr: float, t_i: float) -> float:
        """LR at ``t_curr`` into a cycle of length ``t_i`` that starts at ``lr_max``."""
        raise NotImplementedError
