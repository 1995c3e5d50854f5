import math
from typing import Literal

from pydantic import Field

from .base import CommonParams, Schedule
from .registry import register


class CosineRestartsParams(CommonParams):
    name: Literal["cosine_restarts"] = "cosine_restarts"
    T_0: float = Field(gt=0, description="epochs until the first restart")
    T_mult: int = Field(1, ge=1)
    eta_min: float = Field(0.0, ge=0)


@register
class CosineRestarts(Schedule):
    """torch CosineAnnealingWarmRestarts (SGDR).

    The cycle is found by summing cycle lengths rather than with torch's
    ``int(log(...))`` for fractional epochs, which can land one cycle short at an exact
    restart when the logarithm rounds down."""

    params_model = CosineRestartsParams

    def curve(self, t: float) -> float:
        p = self.params
        if p.T_mult == 1:
            t_cur, t_i = t % p.T_0, p.T_0
        else:
            start, t_i = 0.0, p.T_0
            while t >= start + t_i:
                start += t_i
                t_i *= p.T_mult
            t_cur = t - start
        return p.eta_min + (self.base_lr - p.eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2
