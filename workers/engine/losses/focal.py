"""Softmax focal loss (Lin et al. 2017) for multi-class targets."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import Loss, is_soft


class FocalLoss(Loss):
    """mean_i  -sum_j alpha_j t_ij (1 - p_ij)^gamma log p_ij  (t one-hot for hard targets).

    log p comes from log_softmax and p = exp(log p), so confident samples neither
    underflow to log(0) nor produce NaN gradients through (1 - p)^gamma at gamma < 1."""

    def __init__(self, gamma: float = 2.0, alpha: Optional[torch.Tensor] = None):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.register_buffer("alpha", alpha, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        if is_soft(logits, target):
            t = target.float()
        else:
            t = F.one_hot(target, logits.shape[-1]).float()
        # clamp: (1 - p) can round to a tiny negative, and 0^gamma's gradient at
        # gamma < 1 is infinite; the clamp keeps both finite.
        mod = (1.0 - logp.exp()).clamp_min(1e-12).pow(self.gamma)
        per_class = -t * mod * logp
        if self.alpha is not None:
            per_class = per_class * self.alpha
        return per_class.sum(-1).mean()
