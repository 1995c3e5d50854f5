"""What both framework callbacks share: owning (or borrowing) a Run, declaring knobs,
turning a framework's metric dict into scalars the SDK accepts."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import trainctl

KnobSpec = Any  # a float, or (value, low, high), or {"value": v, "low": l, "high": h}


def knob_args(name: str, spec: KnobSpec) -> tuple[float, Optional[float], Optional[float]]:
    if isinstance(spec, Mapping):
        return spec["value"], spec.get("low"), spec.get("high")
    if isinstance(spec, (tuple, list)):
        if len(spec) != 3:
            raise ValueError(f"knobs[{name!r}]: {spec!r} must be (value, low, high)")
        return tuple(spec)  # type: ignore[return-value]
    return spec, None, None


def scalars(metrics: Mapping[str, Any], skip=()) -> dict:
    """The entries that are one number (floats, ints, one-element tensors), others dropped:
    a framework's dict may hold strings or whole tensors the server has no use for."""
    out = {}
    for k, v in metrics.items():
        if k in skip or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            if math.isfinite(v):
                out[str(k)] = float(v)
        elif getattr(v, "numel", None) is not None and v.numel() == 1:
            out[str(k)] = v.detach().reshape(())  # stays on its device; the SDK copies in batches
    return out


def one_line(exc: BaseException) -> str:
    from trainctl.attach.run import _one_line  # the reason a run's own __exit__ gives

    return _one_line(type(exc), exc)


class RunOwner:
    """The run a callback reports to: created at the start of training from the callback's
    arguments (and then finished by the callback), or handed in (`run=`), in which case
    whoever made it finishes it."""

    def __init__(self, run=None, name: Optional[str] = None, config: Any = None, tags=None,
                 server: Optional[str] = None, token: Optional[str] = None,
                 knobs: Optional[Mapping[str, KnobSpec]] = None):
        if run is None and not name:
            raise ValueError("name: a callback needs name=... (or run=trainctl.init(...))")
        self.run = run
        self._owned = run is None
        self._init = dict(name=name, config=config, tags=tags, server=server, token=token)
        self._knob_specs = dict(knobs or {})
        for n, spec in self._knob_specs.items():
            knob_args(n, spec)  # shape errors now, not mid-fit
        self.knobs: dict = {}

    def start(self, default_config: Any = None):
        if self.run is None:
            init = dict(self._init)
            if init["config"] is None:
                init["config"] = default_config
            self.run = trainctl.init(**init)
        for n, spec in self._knob_specs.items():
            self.knobs[n] = self.run.knob(n, *knob_args(n, spec))
        return self.run

    def knob(self, name: str) -> float:
        """The knob's current value (changes only at step boundaries)."""
        return self.knobs[name].value

    def end(self, state: str, message: str = "") -> None:
        if self.run is not None and self._owned:
            self.run.finish(state, message)


class OwnsRun:
    """What both callbacks expose of their `RunOwner` (set as `self._owner`)."""

    _owner: RunOwner

    @property
    def run(self):
        return self._owner.run

    @property
    def knobs(self) -> dict:
        return self._owner.knobs

    def knob(self, name: str) -> float:
        return self._owner.knob(name)
