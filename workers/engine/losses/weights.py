"""Per-class weight vectors built from the training class counts."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch


def _counts(class_counts: Sequence[int], num_classes: int) -> torch.Tensor:
    if len(class_counts) != num_classes:
        raise ValueError(f"class_counts has {len(class_counts)} entries for {num_classes} classes")
    # An empty class would give an infinite weight/margin; treating it as one sample
    # keeps the loss finite and that class's term never appears anyway.
    return torch.as_tensor(list(class_counts), dtype=torch.float64).clamp_min(1.0)


def balanced_weights(class_counts: Sequence[int], num_classes: int) -> torch.Tensor:
    """n / (C * n_j): sklearn's compute_class_weight("balanced"); mean over samples is 1."""
    n = _counts(class_counts, num_classes)
    return (n.sum() / (num_classes * n)).float()


def effective_number_weights(class_counts: Sequence[int], num_classes: int,
                             beta: float) -> torch.Tensor:
    """(1 - beta) / (1 - beta^n_j) normalised to sum to C (Cui et al. 2019, as LDAM-DRW)."""
    n = _counts(class_counts, num_classes)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * num_classes).float()


def resolve_class_weights(spec: Optional[Union[str, Sequence[float]]], *, num_classes: int,
                          class_counts: Optional[Sequence[int]],
                          field: str) -> Optional[torch.Tensor]:
    """Spec value (None | "balanced" | list) -> float32 [C] tensor or None.

    `field` is the spec path used in error messages (e.g. "loss.class_weights")."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise ValueError(f"{field}: unknown weighting {spec!r}; use 'balanced' or a list")
        if class_counts is None:
            raise ValueError(f"{field}: 'balanced' needs the training class counts")
        return balanced_weights(class_counts, num_classes)
    if len(spec) != num_classes:
        raise ValueError(f"{field}: {len(spec)} weights for {num_classes} classes")
    w = torch.as_tensor(list(spec), dtype=torch.float32)
    if not bool((w > 0).all()):
        raise ValueError(f"{field}: weights must be > 0")
    return w
