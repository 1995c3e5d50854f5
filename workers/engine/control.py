"""Applying control commands to a running job, at a step boundary.

One function for live, scheduled and replayed commands alike, so they cannot drift
apart; LR verbs go through `schedules.apply_control`, the function `schedule preview`
and the server's dry run use too. Every outcome, refusals included, becomes an `Ack` with the applied step and
the old and new value; an applied LR command also says what it means ahead
(`Ack.consequence`, from the same `schedules.consequence` the server's dry run uses).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

from trainctl.controls import SCHEDULE_VERBS, SPEC_VERBS, check_hold
from trainctl.schedules import apply_control, consequence
from trainctl.spec import check_control_value
from trainctl.workers.engine.context import Ack, Command
from trainctl.workers.engine.optim import decaying_groups

log = logging.getLogger(__name__)


class ControlTargets:
    """The mutable things a command may touch."""

    def __init__(self, schedule: Any, optimizer: Any, ema: Optional[Any] = None):
        self.schedule = schedule
        self.optimizer = optimizer
        self.ema = ema


def apply_command(cmd: Command, step: int, t: ControlTargets) -> Ack:
    hold = cmd.hold
    try:
        check_control_value(cmd.verb, cmd.value)
        check_hold(cmd.verb, hold)
        fn = _APPLY[cmd.verb]
    except KeyError:
        return Ack(cmd.command_id, ok=False, applied_step=step, message=f"unknown command {cmd.verb!r}")
    except ValueError as exc:
        return Ack(cmd.command_id, ok=False, applied_step=step, message=str(exc))
    try:
        old, new = fn(cmd.value, step, t, hold)
    except ValueError as exc:  # DecayCannotAct/NoDecayFactor included: the message says why
        return Ack(cmd.command_id, ok=False, applied_step=step, message=str(exc))
    except Exception as exc:  # a bug here must cost one command, never the run
        log.exception("applying %s failed", cmd)
        return Ack(cmd.command_id, ok=False, applied_step=step, message=f"{type(exc).__name__}: {exc}")
    try:
        ahead = consequence(t.schedule, step, cmd.verb)
    except Exception:  # words about the future must never cost the command
        log.exception("describing %s failed", cmd)
        ahead = ""
    return Ack(cmd.command_id, ok=True, applied_step=step, old_value=old, new_value=new, consequence=ahead)


def _set_ema_decay(d: float, step: int, t: ControlTargets, hold: bool = False) -> tuple[float, float]:
    if t.ema is None:
        raise ValueError("set_ema_decay needs model EMA; enable train.ema in the spec")
    return t.ema.set_decay(step, d)


def _set_weight_decay(w: float, step: int, t: ControlTargets, hold: bool = False) -> tuple[float, float]:
    groups = decaying_groups(t.optimizer)
    if not groups:
        raise ValueError("set_weight_decay: the optimizer has no decaying parameter group")
    old = float(groups[0]["weight_decay"]) if groups else math.nan
    for g in groups:
        g["weight_decay"] = w
    return old, w


def _on_schedule(verb: str):
    def apply(v: float, step: int, t: ControlTargets, hold: bool = False) -> tuple[float, float]:
        return apply_control(t.schedule, step, verb, v, hold)
    return apply


# What each verb the engine takes acts on (trainctl.controls declares the verbs; a knob
# names a value the run declared, which only attached runs have).
_APPLY = {
    **{verb: _on_schedule(verb) for verb in SCHEDULE_VERBS},
    "set_ema_decay": _set_ema_decay,
    "set_weight_decay": _set_weight_decay,
}
assert set(_APPLY) == set(SPEC_VERBS), "every spec verb has an applier"
