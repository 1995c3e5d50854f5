from bisect import bisect_right
from typing import Annotated, Literal

from pydantic import Field

from .base import CommonParams, Schedule
from .registry import register


class MultiStepParams(CommonParams):
    name: Literal["multistep"] = "multistep"
    milestones: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, description="epochs at which the LR decays")
    gamma: float = Field(0.1, gt=0, le=1)


@register
class MultiStep(Schedule):
    """torch MultiStepLR: the LR of epoch e is base_lr * gamma ** #{m <= e}. A repeated
    milestone decays twice, as in torch. (timm's MultiStepLRScheduler decays one epoch
    later; torch's is what users' specs are written against.)"""

    params_model = MultiStepParams
    decay_param = "gamma"

    def __init__(self, params, **kw) -> None:
        super().__init__(params, **kw)
        # Sorted copy: the caller's list stays as given.
        self._milestones = sorted(params.milestones)

    def decays_at(self, t: float) -> float:
        return bisect_right(self._milestones, t)

    def curve(self, t: float) -> float:
        return self.base_lr * self.decay_multiplier(self.decays_at(t))
