"""Turning recorded and spec-scheduled controls into loop commands.

A replay applies every command that was applied in the original run at the step it was
applied at (`Command(at_step=applied_step)`); since the loop applies scheduled and live
commands through the same function at the start of a step, the replayed run sees the
same LR/decay/weight-decay at every step, hence (on CPU, deterministic) the same losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from trainctl.spec import Spec
from trainctl.workers.engine.context import Ack, Command


@dataclass(frozen=True)
class ControlRecord:
    """One line of a run's control log: what was asked and what happened."""

    command_id: str
    verb: str
    value: float
    ok: bool
    applied_step: Optional[int]
    old_value: float = float("nan")
    new_value: float = float("nan")
    hold: bool = False


def control_log(commands: Iterable[Command], acks: Iterable[Ack]) -> list[ControlRecord]:
    """Join the commands sent to a run with the acks it answered (by command id)."""
    by_id = {a.command_id: a for a in acks}
    out = []
    for c in commands:
        a = by_id.get(c.command_id)
        if a is not None:
            out.append(ControlRecord(c.command_id, c.verb, c.value, a.ok, a.applied_step, a.old_value, a.new_value,
                                     c.hold))
    return out


def commands_from_log(records: Iterable[Any]) -> list[Command]:
    """Scheduled commands that redo a control log. Records are `ControlRecord`s or any
    object/dict with verb, value, applied_step and ok (or a status of APPLIED); refused
    or never-applied commands changed nothing and are left out."""
    out = []
    for r in records:
        get = r.get if isinstance(r, dict) else (lambda k, d=None, r=r: getattr(r, k, d))
        step = get("applied_step")
        ok = get("ok")
        if ok is None:
            status = get("status")
            ok = status in ("APPLIED", "applied") or getattr(status, "name", None) == "APPLIED"
        if not ok or step is None or step < 0:
            continue
        out.append(Command(str(get("command_id", "")), get("verb"), float(get("value")), at_step=int(step),
                           hold=bool(get("hold", False))))
    # Stable sort: commands applied at the same step keep their original order.
    return sorted(out, key=lambda c: c.at_step)


def commands_from_spec(spec: Spec) -> list[Command]:
    """The spec's `control:` entries, for running a Trainer directly (the worker gets
    these from the server, which stores them as scheduled records)."""
    return [Command(f"spec-{i}", c.verb, c.value, at_step=c.at_step) for i, c in enumerate(spec.control)]
