"""Name -> schedule class. Filled by ``@register`` as each schedule module is imported."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Schedule

REGISTRY: dict[str, "type[Schedule]"] = {}


def register(cls: "type[Schedule]") -> "type[Schedule]":
    name = cls.params_model.model_fields["name"].default
    if name in REGISTRY:
        raise ValueError(f"schedule {name!r} registered twice")
    cls.name = name
    REGISTRY[name] = cls
    return cls


def decay_schedules() -> dict[str, str]:
    """Schedules that ``set_lr_decay`` works on, with the parameter it controls."""
    out = {n: c.decay_param for n, c in REGISTRY.items() if c.decay_param}
    out.update({n: "that of its `after`" for n, c in REGISTRY.items() if getattr(c, "delegates_decay", False)})
    return out
