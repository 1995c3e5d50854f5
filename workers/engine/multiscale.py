"""Progressive multi-scale batches.

The size is a pure function of the step (and seed), so a resumed or replayed run sees
the same sizes, and nothing draws from the global RNG. Window 0 (the first `every`
steps) uses the largest size: an out-of-memory shows at the first step, not hours in.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from trainctl.spec import MultiScaleParams


class MultiScale:
    def __init__(self, params: MultiScaleParams, seed: int):
        lo, hi = params.resize_range
        self.sizes = list(range(lo, hi + 1, 16))
        self.every = params.every
        self.seed = seed

    def size_at(self, step: int) -> int:
        window = step // self.every
        if window == 0:
            return self.sizes[-1]
        return random.Random(self.seed * 1_000_003 + window).choice(self.sizes)

    @staticmethod
    def resize(x: torch.Tensor, size: int) -> torch.Tensor:
        if x.shape[-2:] == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
