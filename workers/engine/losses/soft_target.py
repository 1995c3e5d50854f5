"""timm's SoftTargetCrossEntropy: -sum_j t_j log p_j, averaged over the batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Loss, is_soft


class SoftTargetCrossEntropy(Loss):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not is_soft(logits, target):
            # Validation batches carry class indices; one-hot keeps one loss for both.
            target = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
