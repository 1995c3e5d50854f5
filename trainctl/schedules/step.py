import math
from typing import Literal

from pydantic import Field

from .base import CommonParams, Schedule
from .registry import register


class StepParams(CommonParams):
    name: Literal["step"] = "step"
    step_size: int = Field(gt=0, description="epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1)


@register
class Step(Schedule):
    """torch StepLR: base_lr * gamma ** floor(t / step_size)."""

    params_model = StepParams
    decay_param = "gamma"

    def decays_at(self, t: float) -> float:
        return math.floor(t / self.params.step_size)

    def curve(self, t: float) -> float:
        return self.base_lr * self.decay_multiplier(self.decays_at(t))
