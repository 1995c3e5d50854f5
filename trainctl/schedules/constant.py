from typing import Literal

from .base import CommonParams, Schedule
from .registry import register


class ConstantParams(CommonParams):
    name: Literal["constant"] = "constant"


@register
class Constant(Schedule):
    """The base LR after the (optional) warmup."""

    params_model = ConstantParams

    def curve(self, t: float) -> float:
        return self.base_lr
