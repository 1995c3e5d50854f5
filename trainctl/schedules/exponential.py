from typing import Literal

from pydantic import Field

from .base import CommonParams, Schedule
from .registry import register


class ExponentialParams(CommonParams):
    name: Literal["exponential"] = "exponential"
    gamma: float = Field(gt=0, le=1, description="LR factor per epoch")


@register
class Exponential(Schedule):
    """torch ExponentialLR: base_lr * gamma ** t. Per step the decay is continuous
    (gamma ** (1/steps_per_epoch) each step), so a decay-factor change takes effect
    from the next step."""

    params_model = ExponentialParams
    decay_param = "gamma"

    def decays_at(self, t: float) -> float:
        return t

    def curve(self, t: float) -> float:
        return self.base_lr * self.decay_multiplier(t)
