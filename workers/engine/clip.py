"""Gradient clipping by global norm, by value, or adaptively per unit (AGC, NFNets)."""
from __future__ import annotations

from typing import Iterable

import torch


def clip_gradients(params: Iterable[torch.nn.Parameter], mode: str, value: float) -> None:
    params = [p for p in params if p.grad is not None]
    if mode == "norm":
        # foreach keeps it one fused kernel per dtype/device and, unlike
        # error_if_nonfinite=True, never reads the norm back to the host.
        torch.nn.utils.clip_grad_norm_(params, value, foreach=True)
    elif mode == "value":
        torch.nn.utils.clip_grad_value_(params, value, foreach=True)
    elif mode == "agc":
        from timm.utils import adaptive_clip_grad

        adaptive_clip_grad(params, clip_factor=value)
    else:
        raise ValueError(f"train.clip_mode: unknown {mode!r}")
