import math
from typing import Literal

from pydantic import Field

from ._cycles import CycleParams, CyclicSchedule
from .registry import register


class CosineParams(CycleParams):
    name: Literal["cosine"] = "cosine"
    k_decay: float = Field(1.0, gt=0)


@register
class Cosine(CyclicSchedule):
    """timm CosineLRScheduler (SGDR with cycles, k-decay, noise)."""

    params_model = CosineParams

    def shape(self, lr_max: float, t_curr: float, t_i: float) -> float:
        k, lo = self.params.k_decay, self.params.min_lr
        return lo + 0.5 * (lr_max - lo) * (1 + math.cos(math.pi * t_curr**k / t_i**k))
