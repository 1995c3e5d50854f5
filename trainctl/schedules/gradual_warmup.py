import math
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from .base import CommonParams, Schedule
from .registry import REGISTRY, register


class GradualWarmupParams(CommonParams):
    name: Literal["gradual_warmup"] = "gradual_warmup"
    multiplier: float = Field(1.0, ge=1, description="target LR = base_lr * multiplier")
    total_epoch: float = Field(gt=0, description="epochs to reach the target LR")
    # Any other schedule's params; "AfterParams" is resolved by factory.py once every
    # schedule is registered. None = hold base_lr * multiplier (as upstream).
    after: Optional["AfterParams"] = None  # noqa: F821

    @model_validator(mode="after")
    def _own_warmup(self):
        if self.warmup_epochs or self.warmup_prefix:
            raise ValueError("gradual_warmup has its own warmup: use total_epoch and multiplier, leave warmup_epochs/warmup_prefix unset")
        return self


@register
class GradualWarmup(Schedule):
    """ildoonet's GradualWarmupScheduler: for t < total_epoch the LR is
    base_lr * t / total_epoch (multiplier 1) or base_lr * ((multiplier - 1) * t / total_epoch + 1);
    from total_epoch on it is ``after`` started at time 0 with base_lr * multiplier.
    ``set_lr_decay`` controls ``after``'s decay factor; ``after.per_step`` is honoured."""

    params_model = GradualWarmupParams
    delegates_decay = True

    def __init__(self, params, **kw) -> None:
        super().__init__(params, **kw)
        child = params.after
        if child is None:
            from .constant import ConstantParams

            child = ConstantParams()
        self.after: Schedule = REGISTRY[child.name](
            child,
            base_lr=self.base_lr * params.multiplier,
            steps_per_epoch=self.steps_per_epoch,
            epochs=max(1, math.ceil(self.epochs - params.total_epoch)),
        )
        # One decay history, kept here (so set_decay/state_dict are the base class's).
        self.decay_param = self.after.decay_param
        self.decay_max = self.after.decay_max
        self.decay_max_inclusive = self.after.decay_max_inclusive
        self._decay_history = self.after._decay_history
        self.after.decay_multiplier = self.decay_multiplier
        self._offset_steps = round(params.total_epoch * self.steps_per_epoch)

    def _child_time(self, t: float) -> float:
        tc = max(t - self.params.total_epoch, 0.0)
        return tc if self.after.params.per_step else float(math.floor(tc))

    def value_at(self, t: float, step: int) -> float:
        p = self.params
        if t < p.total_epoch:
            if p.multiplier == 1.0:
                return self.base_lr * (t / p.total_epoch)
            return self.base_lr * ((p.multiplier - 1.0) * t / p.total_epoch + 1.0)
        return self.after.value_at(self._child_time(t), max(step - self._offset_steps, 0))

    def in_warmup(self, step: int) -> bool:
        return self.epoch_time(step) < self.params.total_epoch

    def _decay_ahead(self, step: int, last: int) -> str:
        # The decays are `after`'s, on its own clock (which starts at total_epoch).
        off = self._offset_steps
        if self.after.name == "plateau":  # its epoch ends are ours, shifted by total_epoch
            te, spe = self.params.total_epoch, self.steps_per_epoch
            ends = sum(1 for e in range(step // spe, self.epochs - 1) if e + 1 - te > self.after.warmup and e + 1 > te)
            return self.after.reduction_ahead(ends)
        if last < off:
            return f"gradual_warmup: the run ends during the warmup (step {last}): no decay of its `after` follows"
        return self.after._decay_ahead(max(step - off, 0), last - off)

    def decay_count(self, step: int) -> float:
        tc = self._child_time(self.epoch_time(step))
        return self.after.decays_at(self.after.schedule_time(tc))

    def epoch_end_at(self, t_end: float, metrics: dict[str, float]) -> None:
        if t_end > self.params.total_epoch:
            self.after.epoch_end_at(t_end - self.params.total_epoch, metrics)

    def _extra_state(self) -> dict[str, Any]:
        return {"after": self.after._extra_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.after._load_extra_state(state["after"])
