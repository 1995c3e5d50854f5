"""timm's BinaryCrossEntropy: one-vs-all sigmoid BCE with smoothing and thresholding."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import Loss, is_soft


class BinaryCrossEntropy(Loss):
    def __init__(self, smoothing: float = 0.1, target_threshold: Optional[float] = None,
                 weight: Optional[torch.Tensor] = None, pos_weight: Optional[float] = None,
                 sum_classes: bool = False):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing
        self.target_threshold = target_threshold
        self.sum_classes = sum_classes
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("pos_weight", None if pos_weight is None
                             else torch.tensor(float(pos_weight)), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not is_soft(logits, target):
            # timm's one-hot: off = eps/C, on = 1 - eps + eps/C. Soft (mixup) targets are
            # taken as already smoothed upstream, as in timm.
            c = logits.shape[-1]
            off = self.smoothing / c
            target = torch.full_like(logits, off).scatter_(
                1, target.long().view(-1, 1), 1.0 - self.smoothing + off)
        if self.target_threshold is not None:
            target = target.gt(self.target_threshold).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(
            logits, target.to(logits.dtype), self.weight, pos_weight=self.pos_weight,
            reduction="none")
        return loss.sum(-1).mean() if self.sum_classes else loss.mean()
