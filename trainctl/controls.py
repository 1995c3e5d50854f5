"""The control vocabulary, declared once by the proto's `ControlKind` and derived here.

Every spelling of a verb comes from its enum entry: the wire kind (pb.SET_LR), the
stored and displayed name ("SET_LR"), the spec/engine verb ("set_lr") and the CLI
command ("set-lr"). What the enum cannot say (which verbs take `hold`, which act on
the LR schedule, which name their target) is stated here, once, by enum name, and an
import-time check fails if it names a kind the proto does not have. Adding a verb is
one enum entry plus, where it applies, one name in the sets below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainctl.v1 import trainctl_pb2 as pb

# set_lr/scale_lr --hold pins the LR at the value (the schedule stops until released).
_HOLDS = frozenset({"SET_LR", "SCALE_LR"})
# Verbs the LR schedule applies (schedules.apply_control); the others act on the
# optimizer, the model EMA or a knob.
_ON_SCHEDULE = frozenset({"SET_LR", "SCALE_LR", "SET_LR_DECAY"})
# Verbs that name their target (`knob`): a run declares it, so a spec cannot schedule it.
_NAMED = frozenset({"SET_KNOB"})
# `set-decay --target T` (CLI) and `Client.set_decay(target=T)`: the kind each T sends.
DECAY_TARGETS = {"lr": "SET_LR_DECAY", "ema": "SET_EMA_DECAY", "weight": "SET_WEIGHT_DECAY"}


@dataclass(frozen=True)
class Verb:
    kind: int         # the wire value, pb.ControlKind
    name: str         # the enum name, as stored and shown: "SET_LR"
    verb: str         # spec key and engine verb: "set_lr"
    cli: str          # the CLI command: "set-lr"
    holds: bool       # takes `hold`
    on_schedule: bool  # applied by the LR schedule
    named: bool       # names its target (a knob)


VERBS: tuple[Verb, ...] = tuple(
    Verb(kind=number, name=name, verb=name.lower(), cli=name.lower().replace("_", "-"),
         holds=name in _HOLDS, on_schedule=name in _ON_SCHEDULE, named=name in _NAMED)
    for name, number in pb.ControlKind.items() if number != pb.CONTROL_KIND_UNSPECIFIED)

_unknown = (_HOLDS | _ON_SCHEDULE | _NAMED | set(DECAY_TARGETS.values())) - {v.name for v in VERBS}
if _unknown:  # the proto dropped or renamed a kind these sets still name
    raise ImportError(f"trainctl.controls names kinds the proto lacks: {sorted(_unknown)}")

BY_KIND = {v.kind: v for v in VERBS}
BY_NAME = {v.name: v for v in VERBS}
BY_VERB = {v.verb: v for v in VERBS}

KIND_NAMES: tuple[str, ...] = tuple(v.name for v in VERBS)          # "SET_LR", ... "SET_KNOB"
WIRE_VERBS: tuple[str, ...] = tuple(v.verb for v in VERBS)          # every verb a run may get
SPEC_VERBS: tuple[str, ...] = tuple(v.verb for v in VERBS if not v.named)  # a spec's control: keys
SCHEDULE_VERBS: tuple[str, ...] = tuple(v.verb for v in VERBS if v.on_schedule)
HOLD_VERBS: tuple[str, ...] = tuple(v.verb for v in VERBS if v.holds)
KNOB_VERB: str = next(v.verb for v in VERBS if v.named)


def verb_of(kind: int) -> Optional[str]:
    """The verb of a wire `ControlKind` (SET_LR -> "set_lr"), None if unknown."""
    v = BY_KIND.get(kind)
    return v.verb if v else None


def kind_of(spelling: str) -> Optional[int]:
    """The wire kind of any spelling ("SET_LR", "set_lr", "set-lr"), None if unknown."""
    v = BY_NAME.get(spelling.upper().replace("-", "_"))
    return v.kind if v else None


def check_hold(verb: str, hold: bool) -> None:
    if hold and verb not in HOLD_VERBS:
        raise ValueError(f"hold applies to {' and '.join(HOLD_VERBS)} only, not {verb}")
