"""build_loss: spec section `loss:` -> a Loss module."""
from __future__ import annotations

from typing import Optional, Sequence

from .base import Loss
from .bce import BinaryCrossEntropy
from .cross_entropy import CrossEntropy
from .focal import FocalLoss
from .ldam import LDAMLoss
from trainctl.params.loss import (BceParams, CrossEntropyParams, FocalParams, LdamParams,
                     SoftTargetParams)
from .soft_target import SoftTargetCrossEntropy
from .weights import resolve_class_weights


def build_loss(params, *, num_classes: int,
               class_counts: Optional[Sequence[int]] = None) -> Loss:
    """class_counts: training-set count per class (DataBundle.class_counts); needed by
    ldam and by class weights "balanced". The module is on CPU: `.to(device)` it."""
    def weights(value, field):
        return resolve_class_weights(value, num_classes=num_classes,
                                     class_counts=class_counts, field=field)

    if isinstance(params, CrossEntropyParams):
        return CrossEntropy(params.label_smoothing,
                            weights(params.class_weights, "loss.class_weights"))
    if isinstance(params, SoftTargetParams):
        return SoftTargetCrossEntropy()
    if isinstance(params, BceParams):
        return BinaryCrossEntropy(params.smoothing, params.target_threshold,
                                  weights(params.class_weights, "loss.class_weights"),
                                  params.pos_weight, params.sum_classes)
    if isinstance(params, FocalParams):
        return FocalLoss(params.gamma, weights(params.alpha, "loss.alpha"))
    if isinstance(params, LdamParams):
        if class_counts is None or len(class_counts) != num_classes:
            raise ValueError("loss: ldam needs the training class counts, one per class")
        return LDAMLoss(class_counts, max_m=params.max_m, s=params.s,
                        weight=weights(params.class_weights, "loss.class_weights"),
                        drw_epoch=params.drw_epoch, beta=params.beta)
    raise TypeError(f"not a loss spec: {params!r}")
