from typing import Literal

from pydantic import Field

from .base import CommonParams, Schedule
from .registry import register


class LinearParams(CommonParams):
    name: Literal["linear"] = "linear"
    start_factor: float = Field(1.0 / 3, gt=0, le=1)
    end_factor: float = Field(1.0, ge=0, le=1)
    total_iters: float = Field(5, gt=0, description="epochs to go from start_factor to end_factor")


@register
class Linear(Schedule):
    """torch LinearLR: base_lr * factor, factor linear from start_factor to end_factor
    over total_iters epochs, then constant."""

    params_model = LinearParams

    def curve(self, t: float) -> float:
        p = self.params
        return self.base_lr * (p.start_factor + (p.end_factor - p.start_factor) * min(t, p.total_iters) / p.total_iters)
