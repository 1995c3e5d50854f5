"""What every trainctl loss shares: the module contract and the soft-target CE."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Loss(nn.Module):
    """forward(logits [B, C], target) -> scalar; target is int64 class indices [B] or
    float soft targets [B, C] (mixup/cutmix). Class weights and margins are buffers, so
    `loss.to(device)` moves them with the module."""

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop at the start of every epoch (0-based); most losses ignore it."""


def is_soft(logits: torch.Tensor, target: torch.Tensor) -> bool:
    if target.dtype.is_floating_point:
        if target.shape != logits.shape:
            raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(target.shape)}")
        return True
    if target.shape != logits.shape[:1]:
        raise ValueError(f"class-index targets must have shape ({logits.shape[0]},), "
                         f"got {tuple(target.shape)}")
    return False


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                       weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """-sum_j w_j t_ij log p_ij, normalised by sum_ij w_j t_ij.

    With one-hot targets this is exactly F.cross_entropy(weight=w) (which divides by the
    summed target weights); torch's own probability-target path divides by B instead,
    so a weighted loss would change scale between hard and mixed batches."""
    logp = F.log_softmax(logits.float(), dim=-1)
    t = target.float()
    if weight is None:
        return -(t * logp).sum() / t.sum().clamp_min(1e-12)
    tw = t * weight
    return -(tw * logp).sum() / tw.sum().clamp_min(1e-12)
