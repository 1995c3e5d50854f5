"""Model EMA: timm's ModelEmaV3, driven exactly as timm's train.py drives it, with a
steerable, optionally cosine-scheduled decay.

timm's train.py counts optimizer updates from 1 (`num_updates += 1` before
`model_ema.update(model, step=num_updates)`), and ModelEmaV3.get_decay(n) uses decay 0
(a plain copy of the model) for n <= 1. The loop's steps are 0-based, so the update
after loop step k passes n = k + 1: the first update copies the model, the next ones
average. (Passing k itself, as this module once did, copied the model twice and lagged
timm's warmup by one update.)

The decay used by the update after step k is then

    decay(k) = 0                                    for k = 0 (the copy)
             = target(k)                            without warmup
             = min(target(k), 1 - (1 + k)^(-2/3))   with warmup (timm's gamma 1, power 2/3)

    target(k) = 1 - (1 - base) * c(k),  c(k) = (cos(pi k / K) + 1) / 2 with `cosine_to_one`
                                        c(k) = 1 otherwise (K = the run's total steps)

`set_ema_decay d` at step s follows the rule `set_lr` follows for the LR schedule: the
target decay is exactly d at s and the schedule keeps its shape from there. With
`cosine_to_one` that means base := 1 - (1 - d) / c(s), i.e. 1 - tau keeps shrinking by
the same cosine factor towards 1.0 at the end of the run; without it, base := d.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from trainctl.spec import EmaParams


class ModelEma:
    def __init__(self, params: EmaParams, model: torch.nn.Module, total_steps: int,
                 device: Optional[torch.device] = None):
        from timm.utils import ModelEmaV3

        self.cosine = params.cosine_to_one
        self.total_steps = max(total_steps, 1)
        self.base = params.decay
        self.timm = ModelEmaV3(model, decay=params.decay, use_warmup=params.warmup, device=device)

    @property
    def module(self) -> torch.nn.Module:
        return self.timm.module

    def _cos(self, step: int) -> float:
        if not self.cosine:
            return 1.0
        return (math.cos(math.pi * min(step, self.total_steps) / self.total_steps) + 1) / 2

    def target_decay(self, step: int) -> float:
        """The decay at `step` before timm's warmup cap (what controls set and report)."""
        return 1.0 - (1.0 - self.base) * self._cos(step)

    def set_decay(self, step: int, decay: float) -> tuple[float, float]:
        old = self.target_decay(step)
        c = self._cos(step)
        # c(s) is 0 only past the last step, where the decay no longer matters.
        self.base = 1.0 - (1.0 - decay) / c if c > 0 else decay
        return old, decay

    def used_decay(self, step: int) -> float:
        """The decay the update after loop step ``step`` applies (timm's, see above)."""
        self.timm.decay = self.target_decay(step)
        return self.timm.get_decay(step + 1)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # timm applies warmup and its first-update copy inside get_decay(n) and reads
        # .decay as the ceiling, so handing it our target keeps both behaviours; n is
        # the 1-based update count timm's train.py passes (see the module docstring).
        self.timm.decay = self.target_decay(step)
        self.timm.update(model, step=step + 1)

    def state_dict(self) -> dict:
        return {"weights": self.timm.state_dict(), "base": self.base}

    def load_state_dict(self, state: dict) -> None:
        self.timm.load_state_dict(state["weights"])
        self.base = state["base"]
