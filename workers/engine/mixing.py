"""Mixup / CutMix on training batches (timm's Mixup), switched off from `off_epoch`.

Mixed batches carry soft targets [B, C]; every trainctl loss accepts them (see
losses API). timm's Mixup draws from numpy's global RNG, which the checkpoint saves.
"""
from __future__ import annotations

from typing import Optional

import torch

from trainctl.spec import MixupParams


class BatchMixer:
    def __init__(self, params: MixupParams, num_classes: int, batch_size: int):
        from timm.data import Mixup

        if batch_size % 2:
            # timm mixes a batch with its reverse and asserts an even size.
            raise ValueError(f"train.mixup: needs an even data.batch_size, got {batch_size}")
        self.off_epoch = params.off_epoch
        self.mixup = Mixup(mixup_alpha=params.mixup_alpha, cutmix_alpha=params.cutmix_alpha, prob=params.prob,
                           switch_prob=params.switch_prob, label_smoothing=params.label_smoothing,
                           num_classes=num_classes)

    def active(self, epoch: int) -> bool:
        return self.off_epoch is None or epoch < self.off_epoch

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active(epoch):
            return x, y
        return self.mixup(x, y)


def build_mixer(params: Optional[MixupParams], num_classes: int, batch_size: int) -> Optional[BatchMixer]:
    return BatchMixer(params, num_classes, batch_size) if params is not None else None
