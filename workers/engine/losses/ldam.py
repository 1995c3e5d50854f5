"""LDAM loss with optional deferred re-weighting (Cao et al., NeurIPS 2019,
https://arxiv.org/abs/1906.07413), and the cosine classifier head it expects."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Loss, is_soft, soft_cross_entropy
from .weights import effective_number_weights


class LDAMLoss(Loss):
    """CE(s * (z - m_y e_y), y, weight) with per-class margins m_j = C / n_j^(1/4), where C
    makes max_j m_j = max_m.

    The reference code builds the one-hot mask as `torch.cuda.FloatTensor` with a
    `.cuda()` margin list, so it only runs on GPU; here margins and weights are buffers
    that follow `.to(device)`, and the margin is gathered per target, so any batch size
    (including 1 and a ragged last batch) works.

    With drw_epoch set, the class weights become the effective-number weights
    (1 - beta) / (1 - beta^n_j), normalised to sum to C, from that epoch on
    (`set_epoch`); before it, `weight` (default none) applies.
    """

    def __init__(self, class_counts: Sequence[int], max_m: float = 0.5, s: float = 30.0,
                 weight: Optional[torch.Tensor] = None, drw_epoch: Optional[int] = None,
                 beta: float = 0.9999):
        super().__init__()
        if max_m < 0 or s <= 0:
            raise ValueError(f"need max_m >= 0 and s > 0, got max_m={max_m}, s={s}")
        counts = torch.as_tensor(list(class_counts), dtype=torch.float64).clamp_min(1.0)
        m = counts.pow(-0.25)
        m = m * (max_m / m.max())
        self.s = float(s)
        self.drw_epoch = drw_epoch
        self.register_buffer("margins", m.float(), persistent=False)
        self.register_buffer("base_weight", weight, persistent=False)
        self.register_buffer("drw_weight", None if drw_epoch is None else
                             effective_number_weights(class_counts, len(class_counts), beta),
                             persistent=False)
        # The weight in force; swapped by set_epoch, not recomputed per step.
        self.register_buffer("weight", weight, persistent=False)

    def set_epoch(self, epoch: int) -> None:
        if self.drw_epoch is not None and epoch >= self.drw_epoch:
            self.weight = self.drw_weight
        else:
            self.weight = self.base_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if is_soft(logits, target):
            # Mixed targets: each class's logit loses its share t_j * m_j of the margin,
            # which is exactly the hard-target rule when t is one-hot.
            shifted = logits - target.to(logits.dtype) * self.margins.to(logits.dtype)
            return soft_cross_entropy(self.s * shifted, target, self.weight)
        m_y = self.margins.to(logits.dtype).gather(0, target)
        shifted = logits.scatter_add(1, target.view(-1, 1), -m_y.view(-1, 1))
        return F.cross_entropy(self.s * shifted, target, weight=self.weight)


class NormedLinear(nn.Module):
    """Cosine classifier: normalize(x) @ normalize(W)^T, outputs in [-1, 1].

    LDAM's margins are in cosine units and its scale s assumes them; on raw logits a
    margin of 0.5 is meaningless. The weight is [out, in] like nn.Linear (the reference
    code stores it transposed), so a Linear head's state_dict entry loads into it."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        # The reference init: uniform(-1, 1) with renorm, i.e. random unit-ish rows.
        self.weight.data.uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
