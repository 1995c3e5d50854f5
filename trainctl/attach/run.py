"""`trainctl.init(...)` and the `Run` a user's loop talks to.

The loop-side methods are cheap and never touch the network: `step()` appends the
finished row to a deque and, only when a command is due, applies it (a deque check
otherwise); `log()` updates a dict. Session (session.py) does the rest on its threads.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Mapping, Optional

from trainctl.attach.ddp import DEFAULT_EVERY, NoSession, RankSync, world
from trainctl.attach.session import Session
from trainctl.attach.steer import Knob, Outcome, Steering
from trainctl.v1 import trainctl_pb2 as pb

log = logging.getLogger("trainctl.attach")

DEFAULT_SERVER = "localhost:50051"
_STEP, _EPOCH = pb.STEP, pb.EPOCH


def _token(token: Optional[str]) -> Optional[str]:
    if token:
        return token
    if os.environ.get("TRAINCTL_TOKEN"):
        return os.environ["TRAINCTL_TOKEN"]
    path = os.environ.get("TRAINCTL_TOKEN_FILE")
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            log.warning("trainctl: TRAINCTL_TOKEN_FILE %s unreadable (%s); connecting without a token", path, exc)
    return None


def _jsonable(v: Any) -> Any:
    """Config values as JSON values; anything else (paths, dtypes, devices) as its str."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else str(v)
    return str(v)


def _config(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config: expected a mapping or an argparse.Namespace, got {type(config).__name__}")
    return _jsonable(config)


class Run:
    """One attached run. Use as a context manager, or call `finish()`."""

    def __init__(self, *, name: str, config: Any = None, tags: Optional[list[str]] = None,
                 server: Optional[str] = None, token: Optional[str] = None, replay: int = 0,
                 spill_dir: Optional[str] = None, replay_wait: float = 60.0, sync_every: int = DEFAULT_EVERY):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name: {name!r} must be a non-empty string")
        self.name = name
        self.config = _config(config)
        self.steering = Steering()
        self._step = 0
        self._epoch = 0
        self._started = False
        self._row: dict = {}
        self._row_time = 0.0
        self._rows: deque = deque()
        self._due: deque = deque()
        self._waiting: list = []  # replayed commands whose step has not come yet
        self._next_replayed = math.inf  # the earliest step one of them waits for
        self._applied: dict[str, tuple] = {}  # command id -> (outcome, step): each applies once
        self._finished = False
        self.undelivered: list[str] = []
        self.server = server or os.environ.get("TRAINCTL_SERVER") or DEFAULT_SERVER
        # DDP (ddp.py): rank 0 alone talks to the server; its commands reach every rank at
        # the next sync point through `_incoming`. Other ranks keep no rows.
        self.rank, size = world()
        self._sync = RankSync(sync_every) if size > 1 else None
        self._incoming = deque() if self._sync is not None else self._due
        self._sync_cancelled = False
        if self.rank == 0:
            self._session = Session(server=self.server, token=_token(token), name=name, config=self.config,
                                    tags=list(tags or []), replay_of=int(replay or 0), rows=self._rows,
                                    commands=self._incoming, step=lambda: self._step,
                                    knobs=lambda: list(self.steering.knobs.values()), spill_dir=spill_dir)
        else:
            self._rows = deque(maxlen=0)
            self._session = NoSession()
        _live_runs.append(self)
        if replay and self.rank == 0 and not self._session.wait_attached(replay_wait):
            # The recorded commands are needed before the first step; without them the
            # run goes on unsteered rather than fail the user's script.
            log.warning("trainctl: replay of experiment %s: the server did not answer within %.0f s; "
                        "this run goes on WITHOUT the recorded commands", replay, replay_wait)

    # ------------------------------------------------------------------ what the server knows
    @property
    def id(self) -> int:
        """The experiment id (0 until the server has registered the run)."""
        return self._session.experiment_id

    @property
    def cancelled(self) -> bool:
        """Set when a client cancelled the run (`trainctl cancel`); the loop decides when to stop.
        Under DDP every rank sees it at the same step (the next sync point)."""
        if self._sync is not None:
            return self._sync_cancelled
        return bool(self._session.cancelled)

    @property
    def step_count(self) -> int:
        return self._step

    # ------------------------------------------------------------------ steering
    def attach(self, optimizer, scheduler=None) -> "Run":
        """LR and weight-decay commands act on this optimizer (and keep this scheduler's shape)."""
        self.steering.attach(optimizer, scheduler)
        return self

    def knob(self, name: str, value: float, low: Optional[float] = None, high: Optional[float] = None) -> Knob:
        k = self.steering.knob(name, value, low, high)
        self._session.declare_knobs()
        return k

    # ------------------------------------------------------------------ the loop
    def step(self) -> None:
        """An optimizer-step boundary: the previous step's row goes out; due commands apply now."""
        if self._started:
            if self._row:
                self._rows.append((_STEP, self._step, self._epoch, self._row_time, self._row))
                self._row = {}
            self._step += 1
        else:
            self._started = True
        if self._sync is not None and self._step % self._sync.every == 0:
            cmds, cancelled = self._sync.exchange(self._incoming, bool(self._session.cancelled))
            self._due.extend(cmds)
            self._sync_cancelled = self._sync_cancelled or cancelled
        if self._due or self._step >= self._next_replayed:
            self._apply_due()
        if self.steering.optimizer is not None:
            if not self._row:
                self._row_time = time.time()
            self._row["lr"] = self.steering.optimizer.param_groups[0]["lr"]

    def log(self, **scalars) -> None:
        """Scalars of the current step (floats or 0-d tensors; tensors stay on their device
        until a background batch copies them out)."""
        for k, v in scalars.items():
            if getattr(v, "requires_grad", False):  # a loss as is: never hold on to its graph
                scalars[k] = v.detach()
        if not self._row:
            self._row_time = time.time()
        self._row.update(scalars)

    def log_epoch(self, **scalars) -> None:
        """Scalars of the epoch that just ended (e.g. validation); the epoch counter advances."""
        for k, v in scalars.items():
            if getattr(v, "requires_grad", False):
                scalars[k] = v.detach()
        self._rows.append((_EPOCH, self._step, self._epoch, time.time(), scalars))
        self._epoch += 1

    def _apply_due(self) -> None:
        due = self._waiting + [self._due.popleft() for _ in range(len(self._due))]
        self._waiting = []
        for cmd in due:
            if isinstance(cmd, pb.ControlRecord):  # replayed (init(replay=ID)): applies at its recorded step
                if _at_step(cmd) > self._step:
                    self._waiting.append(cmd)
                    continue
            seen = self._applied.get(cmd.command_id)
            if seen is not None:  # sent again after a reconnect: acknowledge again, never apply twice
                self._session.ack(cmd.command_id, *seen)
                continue
            try:
                outcome = self.steering.apply(cmd.kind, cmd.value, hold=cmd.hold, knob=cmd.knob)
            except Exception as exc:  # a user object that misbehaves: refuse the command, keep the loop
                outcome = Outcome(False, message=f"{type(exc).__name__}: {exc}")
            self._applied[cmd.command_id] = (outcome, self._step)
            self._session.ack(cmd.command_id, outcome, self._step)
            if not outcome.ok:
                log.info("trainctl: command %s refused: %s", pb.ControlKind.Name(cmd.kind), outcome.message)
        self._next_replayed = min((_at_step(c) for c in self._waiting), default=math.inf)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"step": self._step, "epoch": self._epoch, "started": self._started, **self.steering.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._step = int(state.get("step", 0))
        self._epoch = int(state.get("epoch", 0))
        self._started = bool(state.get("started", self._step > 0))
        self.steering.load_state_dict(state)

    # ------------------------------------------------------------------ files (files.py)
    @property
    def _files(self):
        files = self.__dict__.get("_files_obj")
        if files is None:
            from trainctl.attach.files import Files
            files = self.__dict__.setdefault("_files_obj", Files(self))
        return files

    @property
    def resumed(self) -> bool:
        """True in a restarted attempt of a submitted command (attempt > 1)."""
        return self._files.attempt() > 1

    @property
    def checkpoint_dir(self):
        """A directory for local checkpoints: the worker's for a submitted command (kept
        across attempts on that box), else a temporary one."""
        return self._files.checkpoint_dir

    def save(self, path_or_obj, name: Optional[str] = None) -> str:
        """Store a file (a path) or an object (torch.save) as this run's artifact `name`,
        uploaded in the background; `finish()` waits for it. Returns the name."""
        return self._files.save(path_or_obj, name)

    def save_checkpoint(self, obj=None) -> str:
        """Checkpoint `obj` with the run's own state (step, steering) into the artifact store,
        so a restarted attempt resumes from it on any worker. Call it after a step's work."""
        return self._files.save_checkpoint(obj)

    def _seal_row(self) -> None:
        """The current step's row goes out now (a checkpoint: the step's work is done), so
        the server can hold every step the checkpoint covers before it is stored."""
        if self._row:
            self._rows.append((_STEP, self._step, self._epoch, self._row_time, self._row))
            self._row = {}

    def load_checkpoint(self, map_location=None, timeout: float = 120.0):
        """The checkpoint this attempt resumes from (a restarted submitted command): the
        run's step and steering are restored, the saved object is returned; None if none."""
        return self._files.load_checkpoint(map_location=map_location, timeout=timeout)

    # ------------------------------------------------------------------ the end
    def finish(self, state: str = "COMPLETED", message: str = "", timeout: float = 10.0) -> list[str]:
        """Flush and end the run (COMPLETED / FAILED / CANCELLED). Waits up to `timeout`
        seconds for the server; returns (and logs as a warning) what it could not deliver."""
        if self._finished:
            return self.undelivered
        self._finished = True
        self._seal_row()
        # Files first: the run's lease (or run token) still lets them in before the final state.
        deadline = time.monotonic() + timeout
        files = self.__dict__.get("_files_obj")
        missing = files.finish(deadline) if files is not None else []
        self.undelivered = missing + self._session.finish(pb.ExperimentState.Value(state), message[:1000],
                                                          max(1.0, deadline - time.monotonic()))
        for what in self.undelivered:
            log.warning("trainctl: run %r: %s", self.name, what)
        if self in _live_runs:
            _live_runs.remove(self)
        return self.undelivered

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish("COMPLETED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("CANCELLED", "interrupted (KeyboardInterrupt)")
        else:
            self.finish("FAILED", _one_line(exc_type, exc))
        return False


def _at_step(rec: pb.ControlRecord) -> int:
    return rec.at_step if rec.HasField("at_step") else rec.applied_step


def _one_line(exc_type, exc) -> str:
    text = f"{exc_type.__name__}: {exc}".strip().splitlines()
    return (text[0] if text else exc_type.__name__)[:500]


def init(name: str, config: Any = None, tags: Optional[list[str]] = None, server: Optional[str] = None,
         token: Optional[str] = None, replay: int = 0, spill_dir: Optional[str] = None,
         replay_wait: float = 60.0, sync_every: int = DEFAULT_EVERY) -> Run:
    """Register this process's training loop as an experiment (kind ATTACHED) and return
    its `Run`. Server and token come from the arguments or TRAINCTL_SERVER /
    TRAINCTL_TOKEN / TRAINCTL_TOKEN_FILE. Returns at once: registration happens in the
    background and is retried until the server answers. With `replay=ID` (a new run
    re-applying ID's recorded commands at the same steps) it first waits up to
    `replay_wait` s for the server, since those commands are needed before step 0.
    Under torch.distributed every rank calls it; rank 0 reports the run, and commands
    apply on every rank at the same step, at most `sync_every` steps after they arrive."""
    return Run(name=name, config=config, tags=tags, server=server, token=token, replay=replay,
               spill_dir=spill_dir, replay_wait=replay_wait, sync_every=sync_every)


# A script that never calls finish(): end its runs at exit, FAILED if an exception
# escaped (seen by the excepthook), COMPLETED otherwise.
_live_runs: list[Run] = []
_escaped: list[str] = []
_previous_hook = sys.excepthook


def _hook(exc_type, exc, tb):
    _escaped.append(_one_line(exc_type, exc))
    _previous_hook(exc_type, exc, tb)


sys.excepthook = _hook


@atexit.register
def _finish_all() -> None:
    for run in list(_live_runs):
        if _escaped:
            run.finish("CANCELLED" if _escaped[0].startswith("KeyboardInterrupt") else "FAILED", _escaped[0], timeout=5)
        else:
            run.finish("COMPLETED", timeout=5)
