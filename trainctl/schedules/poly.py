from typing import Literal

from pydantic import Field

from ._cycles import CycleParams, CyclicSchedule
from .registry import register


class PolyParams(CycleParams):
    name: Literal["poly"] = "poly"
    power: float = Field(0.5, gt=0)
    k_decay: float = Field(1.0, gt=0)


@register
class Poly(CyclicSchedule):
    """timm PolyLRScheduler: min_lr + (peak - min_lr) * (1 - (t/T)**k) ** power."""

    params_model = PolyParams

    def shape(self, lr_max: float, t_curr: float, t_i: float) -> float:
        p = self.params
        return p.min_lr + (lr_max - p.min_lr) * (1 - t_curr**p.k_decay / t_i**p.k_decay) ** p.power
