"""The ScheduleParams union, ``build_schedule`` and ``preview``."""
from __future__ import annotations

from typing import Annotated, Any, Callable, Iterable, Mapping, Optional, Union

from pydantic import Field, TypeAdapter

# Importing a schedule module registers it; the union below is derived from the registry.
from . import (  # noqa: F401
    cawb,
    constant,
    cosine,
    cosine_restarts,
    exponential,
    gradual_warmup,
    linear,
    multistep,
    onecycle,
    plateau,
    poly,
    step,
    tanh,
)
from trainctl.controls import SCHEDULE_VERBS, check_hold

from .base import Schedule
from .registry import REGISTRY


def _union(models):
    return Annotated[Union[tuple(models)], Field(discriminator="name")]  # type: ignore[valid-type]


# gradual_warmup wraps any other schedule (not itself).
AfterParams = _union(c.params_model for c in REGISTRY.values() if c.params_model is not gradual_warmup.GradualWarmupParams)
gradual_warmup.GradualWarmupParams.model_rebuild(_types_namespace={"AfterParams": AfterParams})
ScheduleParams = _union(c.params_model for c in REGISTRY.values())
_adapter: TypeAdapter = TypeAdapter(ScheduleParams)


def parse_schedule(data: Any):
    """Validate a spec's ``schedule`` mapping (or pass a params model through)."""
    if isinstance(data, tuple(c.params_model for c in REGISTRY.values())):
        return data
    return _adapter.validate_python(data)


def build_schedule(params: Any, *, base_lr: float, steps_per_epoch: int, epochs: int) -> Schedule:
    params = parse_schedule(params)
    return REGISTRY[params.name](params, base_lr=base_lr, steps_per_epoch=steps_per_epoch, epochs=epochs)


def apply_control(schedule: Schedule, step: int, kind: str, value: float, hold: bool = False) -> tuple[float, float]:
    """Apply one LR command at ``step``; ``hold`` (set_lr/scale_lr only) pins the LR.

    The one place a schedule takes a command: the training loop (engine/control.py),
    `schedule preview` and the server's dry run all come through here."""
    check_hold(kind, hold)
    if kind == "set_lr":
        return schedule.set_lr(step, value, hold)
    if kind == "scale_lr":
        return schedule.scale_lr(step, value, hold)
    if kind == "set_lr_decay":
        return schedule.set_decay(step, value)
    raise ValueError(f"unknown control kind {kind!r}; expected one of {', '.join(SCHEDULE_VERBS)}")


def preview(
    params: Any,
    *,
    base_lr: float,
    steps_per_epoch: int,
    epochs: int,
    controls: Iterable[tuple] = (),
    metric_fn: Optional[Callable[[int], Mapping[str, float]]] = None,
) -> list[float]:
    """The LR at every step of the run, driven exactly as the training loop drives it:
    for each step, apply the controls due at that step (in the given order), read
    ``lr_at(step)``; after an epoch's last step call ``on_epoch_end(epoch, metrics)``.

    ``controls`` are (step, kind, value) or (step, kind, value, hold).
    ``metric_fn(epoch)`` supplies the metrics; by default every epoch reports the same
    value for every name a schedule might monitor, so a plateau schedule sees no
    improvement after its first epoch and decays every ``patience + 1`` epochs (plus
    ``cooldown``).
    """
    schedule = build_schedule(params, base_lr=base_lr, steps_per_epoch=steps_per_epoch, epochs=epochs)
    due: dict[int, list[tuple[str, float, bool]]] = {}
    for at, kind, value, *hold in controls:
        if kind not in SCHEDULE_VERBS:
            raise ValueError(f"unknown control kind {kind!r}; expected one of {', '.join(SCHEDULE_VERBS)}")
        due.setdefault(int(at), []).append((kind, float(value), bool(hold and hold[0])))
    metric_fn = metric_fn or _ConstantMetrics()
    out = []
    for s in range(steps_per_epoch * epochs):
        for kind, value, hold in due.get(s, ()):
            apply_control(schedule, s, kind, value, hold)
        out.append(schedule.lr_at(s))
        if (s + 1) % steps_per_epoch == 0:
            schedule.on_epoch_end(s // steps_per_epoch, metric_fn(s // steps_per_epoch))
    return out


class _ConstantMetrics(dict):
    """Every metric name reads 1.0."""

    def __call__(self, epoch: int) -> "_ConstantMetrics":
        return self

    def __missing__(self, key: str) -> float:
        return 1.0

    def __contains__(self, key: object) -> bool:
        return True
