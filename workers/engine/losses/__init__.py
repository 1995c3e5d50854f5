"""Losses, one module each (timm's loss/ layout), and the `build_loss` factory.

Importing this package stays torch-free so the server can use `LossParams`; the torch
modules load on first use of `build_loss` or of a loss class."""
from __future__ import annotations

import importlib

from trainctl.params.loss import (LOSS_NAMES, BceParams, CrossEntropyParams, FocalParams, LdamParams,
                     LossParams, SoftTargetParams)

_LAZY = {
    "build_loss": "factory",
    "Loss": "base",
    "CrossEntropy": "cross_entropy",
    "SoftTargetCrossEntropy": "soft_target",
    "BinaryCrossEntropy": "bce",
    "FocalLoss": "focal",
    "LDAMLoss": "ldam",
    "NormedLinear": "ldam",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LOSS_NAMES", "LossParams", "CrossEntropyParams", "SoftTargetParams", "BceParams",
           "FocalParams", "LdamParams", *_LAZY]
