import math
from typing import Literal, Optional

from pydantic import Field

from .base import CommonParams, Schedule
from .registry import register


class OneCycleParams(CommonParams):
    name: Literal["onecycle"] = "onecycle"
    max_lr: Optional[float] = Field(None, gt=0, description="peak LR; default: the optimizer's base LR")
    pct_start: float = Field(0.3, gt=0, lt=1)
    anneal_strategy: Literal["cos", "linear"] = "cos"
    div_factor: float = Field(25.0, gt=0)
    final_div_factor: float = Field(1e4, gt=0)
    three_phase: bool = False


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _linear(start: float, end: float, pct: float) -> float:
    return (end - start) * pct + start


@register
class OneCycle(Schedule):
    """torch OneCycleLR over the whole run: total_steps = epochs * steps_per_epoch when
    per_step, else epochs (one scheduler step per epoch)."""

    params_model = OneCycleParams

    def __init__(self, params, **kw) -> None:
        super().__init__(params, **kw)
        p = params
        self.units = self.steps_per_epoch if p.per_step else 1
        total = self.epochs * self.units
        peak = p.max_lr if p.max_lr is not None else self.base_lr
        initial = peak / p.div_factor
        floor = initial / p.final_div_factor
        if p.three_phase:
            self.phases = [
                (float(p.pct_start * total) - 1, initial, peak),
                (float(2 * p.pct_start * total) - 2, peak, initial),
                (total - 1, initial, floor),
            ]
        else:
            self.phases = [(float(p.pct_start * total) - 1, initial, peak), (total - 1, peak, floor)]
        self.anneal = _cos if p.anneal_strategy == "cos" else _linear

    def warmup_target(self) -> float:
        # A warmup in front of a one-cycle ramps to where the cycle starts, not to base_lr.
        return self.curve(0.0 if self.params.warmup_prefix else self.warmup)

    def curve(self, t: float) -> float:
        u = t * self.units
        if abs(u - round(u)) < 1e-9:  # the step index, free of t = step / spe rounding
            u = round(u)
        start = 0.0
        for i, (end, lo, hi) in enumerate(self.phases):
            if u <= end or i == len(self.phases) - 1:
                # torch raises past total_steps; only a warmup prefix gets there: hold.
                pct = min((u - start) / (end - start), 1.0) if end != start else 1.0
                return self.anneal(lo, hi, pct)
            start = end
        raise AssertionError("unreachable")
