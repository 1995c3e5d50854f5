"""Name -> schedule class. Filled by ``@register`` as each schedule module is imported."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

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


def decay_param_of(params: Any) -> Optional[str]:
    """The decay factor `set_lr_decay` would change for these (validated) schedule params,
    or None, read from the classes alone: the server answers without building a schedule."""
    cls = REGISTRY[params.name]
    if getattr(cls, "delegates_decay", False):  # gradual_warmup: its `after` decides
        after = getattr(params, "after", None)
        return decay_param_of(after) if after is not None else None  # no after: constant
    return cls.decay_param


def no_decay_message(name: str) -> str:
    names = ", ".join(f"{n} ({p})" for n, p in decay_schedules().items())
    return f"schedule {name!r} has no decay factor; schedules with one: {names}"
