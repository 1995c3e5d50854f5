"""What the training loop sees of the outside world.

The loop knows nothing of gRPC. It reports metrics to a `MetricsSink` and reads
commands from a `ControlInbox` at step boundaries; the worker agent plugs in
network-backed versions, tests and `schedule preview` plug in the in-memory ones.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

STEP, EPOCH = "STEP", "EPOCH"


@dataclass(frozen=True)
class Command:
    """A control command as the loop sees it. `at_step` set: apply exactly at that step
    (scheduled or replayed); unset: apply at the next step boundary (live)."""

    command_id: str
    verb: str                 # set_lr | scale_lr | set_lr_decay | set_ema_decay | set_weight_decay
    value: float
    at_step: Optional[int] = None
    hold: bool = False        # set_lr/scale_lr: pin the LR at the value from then on


@dataclass(frozen=True)
class Ack:
    command_id: str
    ok: bool
    applied_step: int
    old_value: float = float("nan")
    new_value: float = float("nan")
    message: str = ""
    consequence: str = ""     # what it means ahead (LR commands), see schedulers/ahead.py


class MetricsSink(Protocol):
    def log(self, scope: str, step: int, epoch: int, values: dict[str, float]) -> None:
        """Hand over one row; must never block the loop on the network."""

    def flush(self) -> None:
        """Called at epoch ends and at the end of the run."""


class NullSink:
    def log(self, scope: str, step: int, epoch: int, values: dict[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass


@dataclass
class ListSink:
    """Keeps every row in memory: tests, preview and replay comparisons."""

    rows: list[tuple[str, int, int, dict[str, float]]] = field(default_factory=list)

    def log(self, scope: str, step: int, epoch: int, values: dict[str, float]) -> None:
        self.rows.append((scope, step, epoch, dict(values)))

    def flush(self) -> None:
        pass

    def series(self, name: str, scope: str = STEP) -> list[tuple[int, float]]:
        return [(step, v[name]) for s, step, _, v in self.rows if s == scope and name in v]


class ControlInbox:
    """Thread-safe mailbox between whoever receives commands and the loop.

    Live commands are queued by the agent's network thread and drained by the loop at
    the start of each step; scheduled ones wait for their step. Acks go back through
    `on_ack` (the agent sends them upstream; the default keeps them for tests)."""

    def __init__(self, scheduled: list[Command] = (), on_ack: Optional[Callable[[Ack], None]] = None):
        self._live: "queue.SimpleQueue[Command]" = queue.SimpleQueue()
        self._scheduled = sorted(scheduled, key=lambda c: c.at_step)
        self._cancel = threading.Event()
        self.cancel_reason = ""
        self.acks: list[Ack] = []
        self._on_ack = on_ack or self.acks.append

    def put(self, command: Command) -> None:
        if command.at_step is None:
            self._live.put(command)
        else:
            self._scheduled.append(command)
            self._scheduled.sort(key=lambda c: c.at_step)

    def due(self, step: int) -> list[Command]:
        """Commands to apply before step `step` runs: scheduled ones at or before it
        (in step order, so a resumed run catches up in order), then live ones."""
        out = []
        while self._scheduled and self._scheduled[0].at_step <= step:
            out.append(self._scheduled.pop(0))
        while True:
            try:
                out.append(self._live.get_nowait())
            except queue.Empty:
                return out

    def drop_before(self, step: int) -> None:
        """Forget scheduled commands before `step` (a resumed run already has them)."""
        self._scheduled = [c for c in self._scheduled if c.at_step >= step]

    def ack(self, ack: Ack) -> None:
        self._on_ack(ack)

    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        self._cancel.set()

    def orphaned(self) -> bool:
        """Whoever reads this run's results is gone (the run process's agent died): a
        checkpoint now would hold work nobody received."""
        return False

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is what users see as the failure reason."""


class Cancelled(Exception):
    pass


@dataclass
class Summary:
    val_top1: float
    best_val_top1: float
    best_epoch: int
    val_balanced_acc: float
    val_loss: float
    train_loss: float
    steps: int
    epochs: int
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> "Summary":
        return cls(**{k: int(v) if k in ("steps", "best_epoch", "epochs") else v for k, v in d.items()})


@dataclass(frozen=True)
class Lineage:
    """Whose checkpoints these are, and how far a resume may go back in.

    Every checkpoint records (store_id, experiment_id, attempt, step, epoch); a resume
    loads one only when store and experiment match, and only one that the store has
    seen the metrics of: its step <= `delivered_steps` and its epoch count <=
    `delivered_epochs`. A checkpoint taken past that holds training nobody saw (a
    fenced attempt that trained on, a worker killed before its rows reached the
    server); resuming from it would leave those steps missing. None = no limit (local
    runs and tests without a server)."""

    store_id: str = ""
    experiment_id: int = 0
    attempt: int = 0
    delivered_steps: Optional[int] = None
    delivered_epochs: Optional[int] = None


@dataclass
class TrainingContext:
    """Everything the loop needs besides the spec."""

    sink: MetricsSink = field(default_factory=NullSink)
    inbox: ControlInbox = field(default_factory=ControlInbox)
    checkpoint_dir: Optional[str] = None
    # Called with the current step roughly once a second so the agent can heartbeat.
    on_progress: Callable[[int], None] = lambda step: None
    lineage: Optional[Lineage] = None
    # Things a user should know about this run that are not failures (resumed from a
    # checkpoint, a corrupt one set aside): the agent logs them and shows them as the
    # RUNNING state's message.
    on_note: Callable[[str], None] = lambda text: None
    # Called with (path, step) once a checkpoint file is complete (renamed into place):
    # the agent uploads it to the artifact store so a run resumes on another box.
    on_checkpoint: Callable[[str, int], None] = lambda path, step: None
    # Called with each line of the run process's logging (workers/pipe.py LogText): the
    # agent ships it as the run's LOGGING output. DDP's ranks send none.
    on_log: Callable[[str], None] = lambda text: None
