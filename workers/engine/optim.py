"""Optimizer construction from the spec."""
from __future__ import annotations

import torch

from trainctl.spec import OptimizerParams


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Biases and norm weights never decay (timm's rule); the other group is marked so a
    live `set_weight_decay` finds it even when the spec started at 0."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0, "decays": False},
            {"params": decay, "weight_decay": weight_decay, "decays": True}]


def build_optimizer(params: OptimizerParams, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, params.weight_decay)
    if params.name == "sgd":
        return torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum, nesterov=params.nesterov)
    if params.name == "adamw":
        return torch.optim.AdamW(groups, lr=params.lr, betas=params.betas, eps=params.eps)
    if params.name == "adam":
        return torch.optim.Adam(groups, lr=params.lr, betas=params.betas, eps=params.eps)
    return torch.optim.RMSprop(groups, lr=params.lr, momentum=params.momentum, eps=params.eps)


def decaying_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The groups whose weight decay follows the spec (and `set_weight_decay`)."""
    return [g for g in optimizer.param_groups if g.get("decays")]
