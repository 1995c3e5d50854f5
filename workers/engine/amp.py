"""Mixed precision: autocast dtype, and fp16's grad scaler.

bf16 has fp32's exponent range, so it needs no loss scaling and works on CPU too;
fp16 underflows gradients without a GradScaler, which torch only provides for CUDA here,
so fp16 is refused on CPU rather than silently training with vanishing gradients.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Union

import torch


class PrecisionError(ValueError):
    pass


class Precision:
    def __init__(self, amp: Union[bool, str], device: torch.device):
        self.device = device
        self.dtype: Optional[torch.dtype] = {True: torch.bfloat16, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}.get(amp)
        if self.dtype is torch.float16 and device.type != "cuda":
            raise PrecisionError("train.amp: fp16 needs a CUDA device (its grad scaler is CUDA-only "
                                 "here); use amp: bf16 on CPU")
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype is torch.float16 else None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, before_step: Callable[[], None]) -> None:
        """`before_step` (clipping) sees true-scale gradients."""
        if self.scaler is None:
            before_step()
            optimizer.step()
            return
        self.scaler.unscale_(optimizer)
        before_step()
        # Skips the update (and lowers the scale) when fp16 gradients overflowed.
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)
