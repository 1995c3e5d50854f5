import math
from bisect import bisect_right
from typing import Annotated, Literal

from pydantic import Field, model_validator

from .base import CommonParams, Schedule
from .registry import register


class CawbParams(CommonParams):
    name: Literal["cawb"] = "cawb"
    eta_min: float = Field(0.05, ge=0, le=1, description="floor as a fraction of each segment's peak")
    steps: list[Annotated[float, Field(ge=0)]] = Field(default_factory=list, description="epochs where a segment starts")
    step_scale: float = Field(0.8, gt=0, le=1, description="peak factor per new segment")
    epoch_scale: float = Field(1.0, ge=0, description="epochs added to each non-final segment's cosine period")
    warmup_epoch: float = Field(0.0, ge=0, description="linear warmup from 0, per batch")

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_epochs or self.warmup_prefix:
            raise ValueError("cawb warms up with warmup_epoch (its segments start after it); leave warmup_epochs/warmup_prefix unset")
        return self


@register
class Cawb(Schedule):
    """Cosine annealing with warm booting (YOLO-style CosineAnnealingWarmbootingLR).

    Segment boundaries are [warmup_epoch] + the steps inside (warmup_epoch, epochs) +
    [epochs]. In segment i (from b_i, period g_i = b_{i+1} - b_i + epoch_scale, without
    the epoch_scale for the last one) the LR is
    step_scale**i * base_lr * ((1 + cos(pi * (t - b_i) / g_i)) / 2 * (1 - eta_min) + eta_min).
    """

    params_model = CawbParams
    decay_param = "step_scale"
    per_batch_warmup = True

    def __init__(self, params, **kw) -> None:
        super().__init__(params, **kw)
        self.warmup = float(params.warmup_epoch)
        if self.warmup >= self.epochs:
            raise ValueError(f"cawb warmup_epoch ({self.warmup:g}) must be < epochs ({self.epochs})")
        inner = sorted({s for s in params.steps if self.warmup < s < self.epochs})  # a copy: never the caller's list
        self.bounds = [self.warmup] + inner + [float(self.epochs)]

    def decays_at(self, t: float) -> float:
        return min(max(bisect_right(self.bounds, t) - 1, 0), len(self.bounds) - 2)

    def curve(self, t: float) -> float:
        p, b = self.params, self.bounds
        i = self.decays_at(t)
        period = b[i + 1] - b[i] + (p.epoch_scale if i < len(b) - 2 else 0.0)
        x = min(t - b[i], period)  # past the last segment: hold its floor
        c = (1 + math.cos(math.pi * x / period)) / 2
        return self.decay_multiplier(i) * self.base_lr * (c * (1 - p.eta_min) + p.eta_min)
