import math
from typing import Any, Literal

from pydantic import Field

from .base import CommonParams, Schedule
from .registry import register


class PlateauParams(CommonParams):
    name: Literal["plateau"] = "plateau"
    monitor: str = Field("val_loss", min_length=1, description="metric name passed to on_epoch_end")
    mode: Literal["min", "max"] = "min"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(10, ge=0)
    threshold: float = Field(1e-4, ge=0)
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, ge=0)


@register
class Plateau(Schedule):
    """torch ReduceLROnPlateau. The LR only changes at epoch ends (per_step only affects
    the warmup); metrics of epochs that end inside the warmup are ignored (as timm)."""

    params_model = PlateauParams
    decay_param = "factor"
    decay_max_inclusive = False  # factor 1 would count reductions that change nothing

    def __init__(self, params, **kw) -> None:
        super().__init__(params, **kw)
        self.best = math.inf if params.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.reductions = 0

    def decays_at(self, t: float) -> float:
        return self.reductions

    def curve(self, t: float) -> float:
        return max(self.base_lr * self.decay_multiplier(self.reductions), self.params.min_lr)

    def _decay_ahead(self, step: int, last: int) -> str:
        # A reduction after the last epoch's end changes no step, and epoch ends inside
        # the warmup are ignored: count the epoch ends that can still reduce the LR.
        spe = self.steps_per_epoch
        return self.reduction_ahead(sum(1 for e in range(step // spe, self.epochs - 1) if e + 1 > self.warmup))

    def reduction_ahead(self, ends: int) -> str:
        """'' when a reduction can still happen in the ``ends`` epoch ends left that a step
        follows (and that the warmup does not ignore); otherwise why not."""
        p = self.params
        if self.cooldown_counter > 0:
            needed = self.cooldown_counter + p.patience + 1
        else:
            needed = max(p.patience + 1 - self.num_bad_epochs, 1)
        if self.curve(0.0) - p.min_lr <= p.eps:
            return f"plateau: the LR is already at min_lr ({p.min_lr:g}): no reduction can follow"
        if ends >= needed:
            return ""
        return (f"plateau: a reduction needs {needed} more epoch(s) without improvement in {p.monitor} "
                f"(patience {p.patience}), but only {ends} epoch end(s) before the last epoch remain: "
                "the factor would change nothing")

    def _better(self, a: float) -> bool:
        p, best = self.params, self.best
        if p.mode == "min":
            return a < (best * (1 - p.threshold) if p.threshold_mode == "rel" else best - p.threshold)
        return a > (best * (1 + p.threshold) if p.threshold_mode == "rel" else best + p.threshold)

    def epoch_end_at(self, t_end: float, metrics: dict[str, float]) -> None:
        if t_end <= self.warmup:
            return
        p = self.params
        try:
            current = float(metrics[p.monitor])
        except KeyError:
            raise ValueError(f"plateau monitors {p.monitor!r} but the epoch reported {sorted(metrics)}") from None
        if self._better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > p.patience:
            old = self.curve(0.0)
            new = max(old * self.decay, p.min_lr)
            if old - new > p.eps:
                self.reductions += 1
            self.cooldown_counter = p.cooldown
            self.num_bad_epochs = 0

    def _extra_state(self) -> dict[str, Any]:
        return {
            "best": self.best if math.isfinite(self.best) else None,  # strict-JSON safe
            "num_bad_epochs": self.num_bad_epochs,
            "cooldown_counter": self.cooldown_counter,
            "reductions": self.reductions,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        best = state["best"]
        self.best = float(best) if best is not None else (math.inf if self.params.mode == "min" else -math.inf)
        self.num_bad_epochs = int(state["num_bad_epochs"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.reductions = int(state["reductions"])
