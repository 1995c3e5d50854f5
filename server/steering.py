"""Steering decisions the server makes before a command reaches a run.

Pure functions over the spec, the stored control log and what the run reported (no
gRPC here; `experiments_service.Control` maps the answers to statuses):

* `static_refusal`: commands this spec can never take (no decay factor, no EMA).
* `Forecast`: the run's LR schedule rebuilt as the worker holds it at the step a command
  would apply at (spec + applied control log + reported epoch metrics), used to refuse a
  `set_lr_decay` no decay can follow (FAILED_PRECONDITION, item 2 of issue 11) and to
  answer a `dry_run` with the same words the worker's ack would carry
  (`schedules.consequence`).

Steps per epoch come from what the run reported (its first epoch row) when there is
one, else from the spec's data size (`trainctl.datasize`, exact for digits/digits_lt/
synthetic); for imagefolder before the first epoch there is no forecast and the worker
alone decides.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Iterable, Optional

from trainctl.controls import HOLD_VERBS, SCHEDULE_VERBS
from trainctl.datasize import steps_per_epoch as spec_steps_per_epoch
from trainctl.schedules import (
    NoDecayFactor,
    Schedule,
    apply_control,
    build_schedule,
    consequence,
)
from trainctl.schedules.ahead import fmt
from trainctl.schedules.factory import _ConstantMetrics
from trainctl.schedules.registry import decay_param_of, no_decay_message
from trainctl.server.store.entities import APPLIED, PENDING, REPLAYED, SCHEDULED, ControlRecord
from trainctl.spec import Spec


def static_refusal(spec: Spec, verb: str) -> str:
    """Why ``verb`` can never apply to this spec, or ''."""
    if verb == "set_lr_decay" and not decay_param_of(spec.schedule):
        return no_decay_message(spec.schedule.name)
    if verb == "set_ema_decay" and spec.train.ema is None:
        return "set_ema_decay needs model EMA; this experiment's spec has no train.ema"
    return ""


def reported_steps_per_epoch(epoch_steps: Iterable[tuple[int, int]]) -> Optional[int]:
    """Steps per epoch from EPOCH rows (step = the step count at the epoch's end)."""
    for step, epoch in epoch_steps:
        if step > 0 and step % (epoch + 1) == 0:
            return step // (epoch + 1)
    return None


@dataclass(frozen=True)
class LoggedCommand:
    """One command of the stored log that the run has applied or will apply before
    the new one: (step, verb, value, hold)."""

    step: int
    verb: str
    value: float
    hold: bool = False


class Forecast:
    """The schedule as the run holds it just before ``step`` (commands due at ``step``
    already applied, in order), to try a new command on."""

    def __init__(self, spec: Spec, steps_per_epoch: int, step: int, log: Iterable[LoggedCommand] = (),
                 epoch_metrics: Optional[dict[int, dict[str, float]]] = None):
        self.spec, self.step, self.steps_per_epoch = spec, step, steps_per_epoch
        self.schedule: Schedule = build_schedule(spec.schedule, base_lr=spec.optimizer.lr,
                                                 steps_per_epoch=steps_per_epoch, epochs=spec.train.epochs)
        metrics = epoch_metrics or {}
        fallback = _ConstantMetrics()
        # The loop's order: a step's commands, then (after an epoch's last step) its end.
        events = [(c.step, 0, i, c) for i, c in enumerate(log) if c.step <= step and c.verb in SCHEDULE_VERBS]
        last_end = min(step // steps_per_epoch, spec.train.epochs)
        events += [((e + 1) * steps_per_epoch - 1, 1, e, None) for e in range(last_end)]
        for at, kind, e, c in sorted(events, key=lambda ev: ev[:3]):
            if kind == 0:
                try:
                    apply_control(self.schedule, at, c.verb, c.value, c.hold)
                except ValueError:
                    pass  # the run refused it too: it changed nothing
            else:
                self.schedule.on_epoch_end(e, metrics.get(e, fallback))

    @property
    def last_step(self) -> int:
        return self.schedule.total_steps - 1

    def decay_refusal(self) -> str:
        """Why a set_lr_decay at ``step`` would change nothing, or ''."""
        if self.step > self.last_step:
            return f"the run has no step after {self.last_step}: no decay follows"
        return self.schedule.decay_ahead(self.step)

    def try_command(self, verb: str, value: float, hold: bool = False) -> tuple[float, float, str]:
        """(old, new, consequence) of ``verb`` applied at ``step`` (mutates the forecast)."""
        if verb in SCHEDULE_VERBS:
            old, new = apply_control(self.schedule, self.step, verb, value, hold)
            return old, new, consequence(self.schedule, self.step, verb)
        if verb == "set_weight_decay":
            return self.spec.optimizer.weight_decay, value, (
                f"weight decay {fmt(value)} from step {self.step} on the decaying parameter groups "
                "(biases and norms never decay)")
        if verb == "set_ema_decay":
            return math.nan, value, f"model-EMA decay {value:g} from step {self.step}"
        raise ValueError(f"unknown command {verb!r}")


def forecast_steps_per_epoch(spec: Spec, epoch_steps: Iterable[tuple[int, int]]) -> Optional[int]:
    """What the run reported, else the spec's data size; None when neither knows."""
    reported = reported_steps_per_epoch(epoch_steps)
    if reported is not None:
        return reported
    try:
        return spec_steps_per_epoch(spec)
    except ValueError:
        return None  # no full step fits: the worker reports that error itself


def no_forecast_reason(spec: Spec) -> str:
    return (f"no forecast: the steps per epoch of dataset {spec.data.dataset!r} are counted by the worker, "
            "and the run has not finished its first epoch yet")


def replayed_commands(records: Iterable[ControlRecord]) -> list[ControlRecord]:
    """What a replay repeats of a run's control log: its applied commands, not the
    spec's scheduled ones (the replay's spec schedules those again)."""
    return [r for r in records if r.source != SCHEDULED and r.status == APPLIED]


def replay_record(r: ControlRecord, experiment_id: int, now: float) -> ControlRecord:
    """Applied command `r` for the replay `experiment_id`: PENDING, REPLAYED, due at the
    step `r` was applied at."""
    return ControlRecord(command_id=uuid.uuid4().hex, experiment_id=experiment_id, kind=r.kind, value=r.value,
                         status=PENDING, source=REPLAYED, requested_at=now, at_step=r.applied_step,
                         hold=r.hold, knob=r.knob)


__all__ = ["Forecast", "LoggedCommand", "NoDecayFactor", "HOLD_VERBS", "static_refusal",
           "forecast_steps_per_epoch", "reported_steps_per_epoch", "no_forecast_reason", "replayed_commands",
           "replay_record"]
