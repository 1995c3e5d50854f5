"""Cross-entropy with label smoothing and class weights, hard or soft targets."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import Loss, is_soft, soft_cross_entropy


class CrossEntropy(Loss):
    def __init__(self, label_smoothing: float = 0.0, weight: Optional[torch.Tensor] = None):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if is_soft(logits, target):
            if self.label_smoothing:
                # Same rule torch applies to hard targets: mix with the uniform distribution.
                target = target * (1.0 - self.label_smoothing) + \
                    self.label_smoothing / logits.shape[-1]
            return soft_cross_entropy(logits, target, self.weight)
        return F.cross_entropy(logits, target, weight=self.weight,
                               label_smoothing=self.label_smoothing)
