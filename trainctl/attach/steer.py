"""Steering state of an attached run: what a command does to the user's optimizer,
scheduler and knobs. Pure Python plus whatever torch objects the user hands in; no
network, so it is tested in-process against unsteered copies of the same schedulers.

The schedule keeps its shape: the scheduler always computes its *own* (unsteered) LR —
before each of its steps the optimizer's groups are put back to the values the scheduler
last gave, after it the SDK multiplies them by one constant. So from the step a command
is applied on, lr = (what the unsteered scheduler gives) x multiplier, for chainable
schedulers (ExponentialLR, ReduceLROnPlateau...) as for closed-form ones (OneCycleLR...).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional

from trainctl.v1 import trainctl_pb2 as pb

# Scheduler attributes that are "the decay factor" (set_lr_decay changes them).
_DECAY_ATTRS = ("gamma", "factor")
# Methods through which a scheduler writes the optimizer's LR (torch: step; timm: also step_update).
_STEP_METHODS = ("step", "step_update")

_steering_of: "weakref.WeakKeyDictionary[Any, Steering]" = weakref.WeakKeyDictionary()
_steered_classes: dict[type, type] = {}


@dataclass(frozen=True)
class Outcome:
    ok: bool
    old: float = 0.0
    new: float = 0.0
    message: str = ""
    consequence: str = ""


class Knob:
    """A float the run declared steerable. `value` changes only at `run.step()`."""
    __slots__ = ("name", "value", "low", "high")

    def __init__(self, name: str, value: float, low: Optional[float] = None, high: Optional[float] = None):
        self.name, self.value, self.low, self.high = name, float(value), low, high

    def __float__(self) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"Knob({self.name!r}, {self.value!r}, low={self.low!r}, high={self.high!r})"

    def as_pb(self) -> pb.Knob:
        return pb.Knob(name=self.name, value=self.value, low=self.low, high=self.high)  # None: unset


def _check_knob(name: str, value: float, low: Optional[float], high: Optional[float]) -> None:
    if not isinstance(name, str) or not name or len(name) > 100:
        raise ValueError(f"knob name: {name!r} must be a non-empty string of at most 100 characters")
    for what, v in (("value", value), ("low", low), ("high", high)):
        if v is not None and not math.isfinite(float(v)):
            raise ValueError(f"knob {name!r} {what}: {v!r} is not a finite number")
    if low is not None and high is not None and low > high:
        raise ValueError(f"knob {name!r}: low {low!r} > high {high!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"knob {name!r} value: {value!r} is outside [{low}, {high}]")


def _steered_class(cls: type) -> type:
    """A subclass of the scheduler's class whose step methods run under the steering. A
    subclass rather than an instance attribute: `scheduler.state_dict()` copies the
    instance's __dict__, which must stay picklable."""
    if cls in _steered_classes:
        return _steered_classes[cls]
    ns: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    for method in _STEP_METHODS:
        if hasattr(cls, method):
            ns[method] = _make_step(cls, method)
    steered = type(cls.__name__, (cls,), ns)
    _steered_classes[cls] = steered
    return steered


def _make_step(cls: type, method: str):
    original = getattr(cls, method)

    def step(self, *args, **kwargs):
        steering = _steering_of.get(self)
        if steering is None:
            return original(self, *args, **kwargs)
        return steering._scheduler_step(lambda: original(self, *args, **kwargs))
    step.__name__ = method
    step.__doc__ = original.__doc__
    return step


class Steering:
    """The steerable state of one run: optimizer groups, scheduler, knobs."""

    def __init__(self) -> None:
        self.optimizer = None
        self.scheduler = None
        self.multiplier = 1.0           # steered LR / the schedule's own LR
        self.held: Optional[list[float]] = None   # set_lr --hold: LRs pinned per group
        self.unsteered: list[float] = []  # what the scheduler last gave, per group
        self.knobs: dict[str, Knob] = {}

    # ------------------------------------------------------------------ setup
    def attach(self, optimizer, scheduler=None) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not groups or not all("lr" in g for g in groups):
            raise TypeError(f"attach: optimizer {type(optimizer).__name__} has no param_groups with an 'lr'")
        if self.scheduler is not None:
            _steering_of.pop(self.scheduler, None)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.unsteered = [float(g["lr"]) / self.multiplier for g in groups] if self.held is None \
            else [float(g["lr"]) for g in groups]
        if scheduler is not None:
            scheduler.__class__ = _steered_class(type(scheduler)) if type(scheduler) not in _steered_classes.values() \
                else type(scheduler)
            _steering_of[scheduler] = self

    def knob(self, name: str, value: float, low=None, high=None) -> Knob:
        value = float(value)
        low = None if low is None else float(low)
        high = None if high is None else float(high)
        _check_knob(name, value, low, high)
        if name in ("lr", "weight_decay"):
            raise ValueError(f"knob name: {name!r} is reserved (steer it with run.attach(optimizer))")
        k = self.knobs.get(name)
        if k is None:
            k = self.knobs[name] = Knob(name, value, low, high)
        else:  # declared again (e.g. after a resume): keep the steered value, update bounds
            k.low, k.high = low, high
        return k

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else float("nan")

    # ------------------------------------------------------------------ the scheduler's step
    def _scheduler_step(self, call):
        groups = self.optimizer.param_groups
        for g, lr in zip(groups, self.unsteered):
            g["lr"] = lr
        try:
            return call()
        finally:
            self.unsteered = [float(g["lr"]) for g in groups]
            self._write_lrs()

    def _write_lrs(self) -> None:
        lrs = self.held if self.held is not None else [u * self.multiplier for u in self.unsteered]
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr

    # ------------------------------------------------------------------ commands
    def apply(self, kind: int, value: float, *, hold: bool = False, knob: str = "") -> Outcome:
        """Apply one command now (the caller is at a step boundary)."""
        if not math.isfinite(value):
            return Outcome(False, message=f"value {value!r} is not a finite number")
        if kind == pb.SET_KNOB:
            return self._set_knob(knob, value)
        if kind == pb.SET_EMA_DECAY:
            return Outcome(False, message="an attached run has no model EMA of trainctl's; declare a knob for yours")
        if self.optimizer is None:
            return Outcome(False, message=f"{pb.ControlKind.Name(kind)}: no optimizer attached (run.attach(optimizer))")
        if kind in (pb.SET_LR, pb.SCALE_LR):
            return self._lr(kind, value, hold)
        if kind == pb.SET_WEIGHT_DECAY:
            return self._weight_decay(value)
        if kind == pb.SET_LR_DECAY:
            return self._lr_decay(value)
        return Outcome(False, message=f"unknown control kind {kind}")

    def _lr(self, kind: int, value: float, hold: bool) -> Outcome:
        old = self.lr
        target = value if kind == pb.SET_LR else old * value
        if target < 0 or (kind == pb.SCALE_LR and value <= 0):
            return Outcome(False, message=f"the LR must stay positive (got {value!r})")
        base = self.unsteered[0]
        if hold:
            ratio = [u / base if base else 1.0 for u in self.unsteered]
            self.held = [target * r for r in ratio]
            self._write_lrs()
            return Outcome(True, old, self.lr, consequence=f"LR pinned at {target:.6g}; the schedule no longer moves it")
        if base == 0:
            return Outcome(False, message="the schedule's LR is 0 at this step, so no multiplier reaches "
                                          f"{target:.6g}; retry later or use hold")
        self.held = None
        self.multiplier = target / base
        self._write_lrs()
        what = "the schedule" if self.scheduler is not None else "the LR (no scheduler: it stays)"
        return Outcome(True, old, self.lr, consequence=f"from here on {what} x {self.multiplier:.6g}")

    def _weight_decay(self, value: float) -> Outcome:
        if value < 0:
            return Outcome(False, message=f"weight decay must be >= 0 (got {value!r})")
        groups = self.optimizer.param_groups
        if not all("weight_decay" in g for g in groups):
            return Outcome(False, message=f"{type(self.optimizer).__name__} has no weight_decay")
        old = float(groups[0]["weight_decay"])
        ref = next((float(g["weight_decay"]) for g in groups if g["weight_decay"]), 0.0)
        for g in groups:
            # Ratios between groups kept (a no-decay group stays at 0); all zero: all set.
            g["weight_decay"] = value * float(g["weight_decay"]) / ref if ref else value
        return Outcome(True, old, float(groups[0]["weight_decay"]))

    def _decay_holders(self) -> list[tuple[Any, str]]:
        s = self.scheduler
        subs = list(getattr(s, "_schedulers", None) or [s])  # SequentialLR / ChainedScheduler
        return [(x, a) for x in subs for a in _DECAY_ATTRS if isinstance(getattr(x, a, None), (int, float))]

    def _lr_decay(self, value: float) -> Outcome:
        if self.scheduler is None:
            return Outcome(False, message="set_lr_decay: no scheduler attached (run.attach(optimizer, scheduler))")
        holders = self._decay_holders()
        if not holders:
            return Outcome(False, message=f"set_lr_decay: {type(self.scheduler).__name__} has no decay factor "
                                          "(StepLR, MultiStepLR, ExponentialLR and ReduceLROnPlateau have one)")
        if not 0 < value <= 1 or (value == 1 and any(a == "factor" for _, a in holders)):
            return Outcome(False, message=f"set_lr_decay: {value!r} must be in (0, 1]"
                                          + (" and < 1 for ReduceLROnPlateau" if value == 1 else ""))
        old = float(getattr(*holders[0]))
        for obj, attr in holders:
            setattr(obj, attr, value)
        return Outcome(True, old, value, consequence=f"later decays multiply the LR by {value:.6g}")

    def _set_knob(self, name: str, value: float) -> Outcome:
        k = self.knobs.get(name)
        if k is None:
            return Outcome(False, message=f"no knob {name!r} (declared: {', '.join(sorted(self.knobs)) or 'none'})")
        if (k.low is not None and value < k.low) or (k.high is not None and value > k.high):
            return Outcome(False, message=f"knob {name!r}: {value!r} is outside [{k.low}, {k.high}]")
        old, k.value = k.value, value
        return Outcome(True, old, value)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        holders = self._decay_holders() if self.scheduler is not None else []
        return {"lr_multiplier": self.multiplier, "held_lrs": self.held, "unsteered_lrs": list(self.unsteered),
                "lr_decay": float(getattr(*holders[0])) if holders else None,
                "weight_decay": [float(g.get("weight_decay", 0.0)) for g in self.optimizer.param_groups]
                if self.optimizer is not None else None,
                "knobs": {n: k.value for n, k in self.knobs.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.multiplier = float(state.get("lr_multiplier", 1.0))
        self.held = state.get("held_lrs")
        if state.get("unsteered_lrs"):
            self.unsteered = [float(x) for x in state["unsteered_lrs"]]
        for name, value in (state.get("knobs") or {}).items():
            if name in self.knobs:
                self.knobs[name].value = float(value)
            else:
                self.knobs[name] = Knob(name, float(value))
        if self.optimizer is not None:
            if state.get("weight_decay"):
                for g, wd in zip(self.optimizer.param_groups, state["weight_decay"]):
                    if "weight_decay" in g:
                        g["weight_decay"] = wd
            if state.get("lr_decay") is not None and self.scheduler is not None:
                for obj, attr in self._decay_holders():
                    setattr(obj, attr, state["lr_decay"])
            self._write_lrs()
