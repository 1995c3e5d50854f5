import math
from typing import Literal

from pydantic import model_validator

from ._cycles import CycleParams, CyclicSchedule
from .registry import register


class TanhParams(CycleParams):
    name: Literal["tanh"] = "tanh"
    lb: float = -7.0
    ub: float = 3.0

    @model_validator(mode="after")
    def _bounds(self):
        if not self.lb < self.ub:
            raise ValueError(f"lb must be < ub, got lb={self.lb}, ub={self.ub}")
        return self


@register
class Tanh(CyclicSchedule):
    """timm TanhLRScheduler (hyperbolic-tangent decay with cycles)."""

    params_model = TanhParams

    def warmup_target(self) -> float:
        # timm's tanh (unlike its cosine) ramps to the curve's value at the end of the
        # warmup when the warmup is not a prefix, so there is no jump there.
        p = self.params
        return self.base_lr if p.warmup_prefix else self.curve(self.warmup)

    def shape(self, lr_max: float, t_curr: float, t_i: float) -> float:
        p = self.params
        tr = t_curr / t_i
        return p.min_lr + 0.5 * (lr_max - p.min_lr) * (1 - math.tanh(p.lb * (1.0 - tr) + p.ub * tr))
