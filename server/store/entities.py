"""Plain values that come out of the store.

Callers (gRPC services, the dispatcher, tests) only ever see these frozen dataclasses,
never ORM rows: a row is bound to a session and may lazy-load or expire after the
session closes, while these are safe to hand across threads and keep around.

Enum-like fields are the proto enum *names* as strings ("RUNNING", "SET_LR", ...), so
mapping to and from the wire is `pb.ExperimentState.Value(name)` / `.Name(number)`.
Times are unix seconds (float).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainctl.controls import KIND_NAMES
from trainctl.v1 import trainctl_pb2 as pb


def _names(enum) -> tuple[str, ...]:
    """The enum's names in proto order, less its *_UNSPECIFIED zero."""
    return tuple(name for name, number in enum.items() if number != 0)


# The name tuples come from the proto enums (declared once there); the constants below
# are the names the store's code spells out, checked against those tuples at import.

# -- experiment states -------------------------------------------------------------

QUEUED = "QUEUED"
ASSIGNED = "ASSIGNED"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"

STATES = _names(pb.ExperimentState)
FINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED})
# States in which a worker holds the experiment (its lease is live).
ACTIVE_STATES = frozenset({ASSIGNED, RUNNING})

# -- metric scopes -----------------------------------------------------------------

STEP = "STEP"
EPOCH = "EPOCH"
SCOPES = _names(pb.Scope)

# -- control records ---------------------------------------------------------------

CONTROL_KINDS = KIND_NAMES  # SET_LR ... SET_KNOB, from trainctl.controls
SET_KNOB = "SET_KNOB"  # a knob the run declared, named by ControlRecord.knob

# -- experiment kinds (proto ExperimentKind names) ----------------------------------

SPEC = "SPEC"
ATTACHED = "ATTACHED"  # the user's own loop through the SDK: never dispatched to a worker
CODE = "CODE"
EXPERIMENT_KINDS = _names(pb.ExperimentKind)

PENDING = "PENDING"
APPLIED = "APPLIED"
REJECTED = "REJECTED"
EXPIRED = "EXPIRED"  # the run ended (or its step never came) before the command applied
CONTROL_STATUSES = _names(pb.ControlStatus)
# Every command ends in one of these, never PENDING forever (see SqlAlchemyStore).
CONTROL_FINAL_STATUSES = frozenset({APPLIED, REJECTED, EXPIRED})

LIVE = "LIVE"
SCHEDULED = "SCHEDULED"
REPLAYED = "REPLAYED"
CONSOLE = "CONSOLE"  # sent from the web console
CONTROL_SOURCES = _names(pb.ControlSource)

_spelled = {STATES: (QUEUED, ASSIGNED, RUNNING, COMPLETED, FAILED, CANCELLED), SCOPES: (STEP, EPOCH),
            CONTROL_KINDS: (SET_KNOB,), EXPERIMENT_KINDS: (SPEC, ATTACHED, CODE),
            CONTROL_STATUSES: (PENDING, APPLIED, REJECTED, EXPIRED),
            CONTROL_SOURCES: (LIVE, SCHEDULED, REPLAYED, CONSOLE)}
_stale = [n for names, spelled in _spelled.items() for n in spelled if n not in names]
if _stale:  # the proto renamed or dropped a value this module still spells out
    raise ImportError(f"server/store/entities.py names values the proto lacks: {_stale}")


@dataclass(frozen=True)
class Experiment:
    id: int
    name: str
    state: str
    spec: dict
    created_at: float
    started_at: float | None
    finished_at: float | None
    # 0 until first claimed; every claim increments it, so (id, attempt) names one run
    # of the experiment and lets the store refuse messages from an older run.
    attempt: int
    worker_id: str | None
    message: str
    summary: dict[str, float]
    last_step: int
    max_restarts: int
    restarts: int
    gpus: int
    replay_of: int | None
    tags: tuple[str, ...] = ()  # sorted
    note: str = ""
    kind: str = SPEC
    run_token_hash: str | None = None  # ATTACHED: sha256 hex of the session's run token

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class ControlRecord:
    command_id: str
    experiment_id: int
    kind: str
    value: float
    status: str = PENDING
    source: str = LIVE
    requested_at: float = 0.0
    applied_at: float | None = None
    applied_step: int | None = None
    old_value: float | None = None
    new_value: float | None = None
    message: str = ""
    # SCHEDULED/REPLAYED commands must be applied exactly at this step; None for LIVE.
    at_step: int | None = None
    # What the command means ahead, in words (from the worker's ack).
    consequence: str = ""
    # SET_LR/SCALE_LR: the LR stays at the value from then on (part of the command's
    # identity: a retry with another hold is another command).
    hold: bool = False
    knob: str = ""  # SET_KNOB: the knob's name (part of the command's identity)


@dataclass(frozen=True)
class Knob:
    """A float a run declared steerable, with its current value and optional bounds."""

    name: str
    value: float
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Artifact:
    """A named artifact record; its bytes are the blob `sha256` in the artifact store.
    `kind` is a proto ArtifactKind name (ARTIFACT_CODE, ARTIFACT_CHECKPOINT, ARTIFACT_FILE)."""

    experiment_id: int
    name: str
    kind: str
    sha256: str
    size: int
    attempt: int = 0
    step: int = 0
    created_at: float = 0.0


@dataclass(frozen=True)
class MetricSeries:
    """One metric over steps (column format, what GetMetrics and plots want)."""

    name: str
    scope: str
    steps: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class MetricRow:
    """Every metric stored for one (scope, step): what Watch replays as history."""

    scope: str
    step: int
    epoch: int
    wall_time: float
    values: dict[str, float]


@dataclass(frozen=True)
class Worker:
    id: str
    hostname: str
    devices: list[dict]
    connected: bool
    last_seen: float


@dataclass(frozen=True)
class LogLine:
    """One stored line of a run's output; `stream` is a proto LogStream value."""

    attempt: int
    index: int
    stream: int
    wall_time: float
    text: str
