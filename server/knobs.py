"""Knobs: the named floats a run can be steered by (`trainctl set ID NAME VALUE`).

An attached run declares its own (KnobDeclaration, stored with their bounds); a spec run
lists the values the engine steers, derived from its spec as configured (lr,
weight_decay, and ema_decay when model EMA is on). Spec runs are steered through their
own verbs (set-lr, set-wd, ...), so SET_KNOB is for declared knobs only.
"""
from __future__ import annotations

from trainctl.server.store import entities as e


def spec_knobs(spec: dict) -> list[e.Knob]:
    """A spec run's steerable values as configured (not updated live: a follow-up may
    take them from the acks, as declared knobs are)."""
    opt = spec.get("optimizer") or {}
    knobs = []
    if isinstance(opt.get("lr"), (int, float)):
        knobs.append(e.Knob("lr", float(opt["lr"]), 0.0, 100.0))
    if isinstance(opt.get("weight_decay"), (int, float)):
        knobs.append(e.Knob("weight_decay", float(opt["weight_decay"]), 0.0, 1.0))
    ema = (spec.get("train") or {}).get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("decay"), (int, float)):
        knobs.append(e.Knob("ema_decay", float(ema["decay"]), 0.0, 1.0))
    return knobs


def knobs_of(store, x: e.Experiment) -> list[e.Knob]:
    """What `Get` lists (in a store thread)."""
    if x.kind == e.SPEC:
        return spec_knobs(x.spec)
    return store.list_knobs(x.id)


def knob_refusal(x: e.Experiment, declared: list[e.Knob], name: str, value: float) -> str:
    """Why SET_KNOB name=value cannot go to run x (INVALID_ARGUMENT), or ''."""
    if not name:
        return "knob: SET_KNOB needs the knob's name"
    by_name = {k.name: k for k in declared}
    k = by_name.get(name)
    if k is None:
        have = ", ".join(sorted(by_name)) or "none"
        extra = " (a spec run is steered with set-lr, set-wd, set-ema-decay)" if x.kind == e.SPEC else ""
        return f"knob: experiment {x.id} has no knob {name[:128]!r}; its knobs: {have}{extra}"
    if (k.low is not None and value < k.low) or (k.high is not None and value > k.high):
        low = "-inf" if k.low is None else f"{k.low:g}"
        high = "inf" if k.high is None else f"{k.high:g}"
        return f"value: knob {name!r} must be in [{low}, {high}], got {value:g}"
    return ""
