"""Validation: loss, top-1 and balanced accuracy from one confusion matrix.

Everything accumulates on the device; one copy to the host per evaluation.
Balanced accuracy (the mean of per-class recalls) is what long-tailed runs compare; with
up to 32 classes each class's recall is reported too, named by the class: `val_acc/<name>`
with the class folder's name for imagefolder (`val_acc/three`), the digit for digits
(`val_acc/7`), `class_<i>` for synthetic data.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, *, device: torch.device, num_classes: int,
             autocast: Callable[[], AbstractContextManager], channels_last: bool = False,
             class_names: Optional[Sequence[str]] = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes).cpu()
    seen = int(confusion.sum())
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
    present = confusion.sum(1) > 0
    model.train(was_training)
    out = {"val_loss": float(loss_sum) / max(seen, 1),
           "val_top1": float(confusion.diag().sum()) / max(seen, 1),
           # classes absent from validation would count as 0 recall; leave them out
           "val_balanced_acc": float(per_class[present].mean()) if present.any() else 0.0}
    if num_classes <= PER_CLASS_UP_TO:  # long-tailed runs are judged class by class
        names = per_class_names(class_names, num_classes)
        out.update({names[c]: float(per_class[c]) for c in range(num_classes) if present[c]})
    return out


PER_CLASS_UP_TO = 32  # beyond this, per-class rows would drown the epoch metrics


def per_class_names(class_names: Optional[Sequence[str]], num_classes: int) -> list[str]:
    """`val_acc/<class>` per class index; whitespace in a folder name becomes `_` so the
    name stays one token in CLIs and CSVs. Without names (or a count that does not
    match) the index stands in."""
    if class_names is None or len(class_names) != num_classes:
        class_names = [str(c) for c in range(num_classes)]
    return [f"val_acc/{'_'.join(str(n).split()) or c}" for c, n in enumerate(class_names)]
