"""Spec section `loss:` as a discriminated union of pydantic models.

Torch-free on purpose: the control server validates specs at Submit and has no torch.
"""
from __future__ import annotations

from typing import Annotated, List, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveFloat
from pydantic_core import PydanticCustomError


def _class_weights(value):
    # Checked up front so a bad value gets one message, not one per union member
    # ("class_weights.literal['balanced']: ...; class_weights.list[...]: ...").
    ok = value is None or value == "balanced" or (
        isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value))
    if not ok:
        raise PydanticCustomError("class_weights",
                                  "must be 'balanced' or a list of numbers > 0")
    return value


# Per-class weights: explicit (one positive number per class, length checked at build
# time when the class count is known) or "balanced" = n / (C * n_j), sklearn's rule.
ClassWeights = Annotated[Optional[Union[Literal["balanced"], List[PositiveFloat]]],
                         BeforeValidator(_class_weights)]


class _Loss(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CrossEntropyParams(_Loss):
    name: Literal["cross_entropy"]
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    class_weights: ClassWeights = None


class SoftTargetParams(_Loss):
    """timm SoftTargetCrossEntropy, the loss timm pairs with mixup/cutmix targets."""
    name: Literal["soft_target"]


class BceParams(_Loss):
    """timm BinaryCrossEntropy (one-vs-all sigmoid on every class)."""
    name: Literal["bce"]
    smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)  # timm's default
    target_threshold: Optional[float] = Field(default=None, gt=0.0, lt=1.0)
    class_weights: ClassWeights = None
    pos_weight: Optional[PositiveFloat] = None
    sum_classes: bool = False


class FocalParams(_Loss):
    name: Literal["focal"]
    gamma: float = Field(default=2.0, ge=0.0)
    alpha: ClassWeights = None  # per-class weights, as class_weights elsewhere


class LdamParams(_Loss):
    """LDAM (Cao et al., NeurIPS 2019), optionally with deferred re-weighting (DRW)."""
    name: Literal["ldam"]
    max_m: float = Field(default=0.5, gt=0.0)
    s: float = Field(default=30.0, gt=0.0)
    # Epoch (0-based) from which effective-number weights switch on; None = never.
    drw_epoch: Optional[int] = Field(default=None, ge=0)
    beta: float = Field(default=0.9999, gt=0.0, lt=1.0)
    # Weights used before drw_epoch (or always, without DRW).
    class_weights: ClassWeights = None


LossParams = Annotated[
    Union[CrossEntropyParams, SoftTargetParams, BceParams, FocalParams, LdamParams],
    Field(discriminator="name"),
]

LOSS_NAMES = ("cross_entropy", "soft_target", "bce", "focal", "ldam")
