"""`trainctl top`: a full-screen live table of several runs.

Each run is seeded from a snapshot (Get, GetMetrics, ListControls), then followed by
its own Watch stream on its own thread, from the step after the snapshot; the screen
redraws from that local state (rich `Live`), so the server is never polled. `--once`
draws the snapshot alone: a Watch stream has no end-of-history marker, so a frame taken
from one could show half the history.
"""
from __future__ import annotations

import math
import os
import select
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from trainctl.client.preview import sparkline
from trainctl.client.render import STATE_STYLE
from trainctl.client.sdk import Client, ControlResult, Event, ExperimentInfo, TrainctlError

SPARK_POINTS = 40   # losses kept per run for the sparkline
SPARK_WIDTH = 20
ACTIVE = ["RUNNING", "ASSIGNED", "QUEUED"]


@dataclass
class RunState:
    id: int
    name: str = ""
    state: str = "?"
    epochs: int = 0
    epoch: int = 0                          # 0-based epoch of the latest step row
    epochs_done: int = 0
    step: int = -1                          # latest step row
    steps_per_epoch: Optional[int] = None   # known once an epoch row arrives
    lr: Optional[float] = None
    loss: Optional[float] = None
    losses: deque = field(default_factory=lambda: deque(maxlen=SPARK_POINTS))
    val_top1: Optional[float] = None
    last_control: str = ""
    last_control_at: float = -math.inf
    error: str = ""

    @classmethod
    def of(cls, x: ExperimentInfo) -> "RunState":
        r = cls(x.id)
        r.set_experiment(x)
        return r

    def set_experiment(self, x: ExperimentInfo) -> None:
        self.name, self.state = x.name, x.state
        self.epochs = int(x.spec.get("train", {}).get("epochs", 0) or 0)

    def apply(self, ev: Event) -> None:
        if ev.kind == "experiment":
            self.set_experiment(ev.experiment)
        elif ev.kind == "step":
            if ev.step <= self.step:  # already have it (snapshot and stream overlap)
                return
            self.step, self.epoch = ev.step, ev.epoch
            self.lr = ev.values.get("lr", self.lr)
            if "loss" in ev.values:
                self.loss = ev.values["loss"]
                self.losses.append(self.loss)
        elif ev.kind == "epoch":
            # An epoch row is logged at the step count after its last step.
            self.epochs_done = max(self.epochs_done, ev.epoch + 1)
            self.steps_per_epoch = ev.step // (ev.epoch + 1) or None
            self.val_top1 = ev.values.get("val_top1", self.val_top1)
        elif ev.kind == "control":
            self.set_control(ev.control)

    def set_control(self, r: ControlResult) -> None:
        # Streams replay the whole log first: keep the most recently resolved, whatever the order.
        at = r.applied_at or r.requested_at or 0.0
        if r.status != "PENDING" and at >= self.last_control_at:
            self.last_control_at = at
            verb, where = r.kind.lower(), f"@{r.applied_step}" if r.applied_step is not None else ""
            self.last_control = f"{verb} {r.value:g} {where}".rstrip() if r.status == "APPLIED" \
                else f"{verb} {r.value:g} {r.status.lower()}"

    def to_json(self) -> dict:
        keep = ("id", "name", "state", "epochs", "step", "steps_per_epoch", "lr", "loss", "val_top1",
                "last_control", "error")
        # "epoch" is the epoch number the text shows ("ep 2/6"), 1-based as everywhere in the CLI
        return {**{k: getattr(self, k) for k in keep}, "epoch": self.epoch_shown(), "losses": list(self.losses),
                "progress": self.progress()}

    def epoch_shown(self) -> int:
        """The epoch number in progress (1-based), or the epochs done before any step row."""
        return min(self.epoch + 1 if self.step >= 0 else self.epochs_done, self.epochs)

    def progress(self) -> float:
        """Fraction of the run done, by epochs (and steps within one once their count is known)."""
        if self.state == "COMPLETED":
            return 1.0
        if not self.epochs:
            return 0.0
        done = float(self.epochs_done)
        if self.steps_per_epoch and self.step >= 0:
            done = max(done, self.epoch + (self.step + 1 - self.epoch * self.steps_per_epoch) / self.steps_per_epoch)
        return min(done / self.epochs, 1.0)


# ---------------------------------------------------------------------- rendering
COLUMNS = ("ID", "NAME", "STATE", "PROGRESS", "LR", "LOSS", "VAL TOP-1", "LAST CONTROL")
# (header, priority): a narrow terminal drops the lowest first, before cutting any value
PRIORITY = {"ID": 9, "NAME": 7, "STATE": 9, "PROGRESS": 8, "LR": 5, "LOSS": 4, "VAL TOP-1": 6, "LAST CONTROL": 3}


def row_cells(r: RunState) -> list:
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=1.0, completed=r.progress(), width=16),
                Text(f"ep {r.epoch_shown()}/{r.epochs}"
                     + (f"  step {r.step}" if r.step >= 0 else "")))
    loss = Text("-" if r.loss is None else f"{r.loss:.4f} ")
    if len(r.losses) > 1:
        loss.append(sparkline(list(r.losses), SPARK_WIDTH), style="cyan")
    state = Text(r.state, style=STATE_STYLE.get(r.state, ""))
    if r.error:
        state.append(f" ({r.error})", style="red")
    return [str(r.id), r.name, state, bar, "-" if r.lr is None else f"{r.lr:.4g}", loss,
            "-" if r.val_top1 is None else f"{r.val_top1:.4f}", r.last_control or "-"]


def runs_table(runs: Iterable[RunState], title: Optional[str] = None, width: Optional[int] = None) -> Table:
    """Fits `width` columns (None: every column, values in full); rows never wrap."""
    from trainctl.client.output import fit_table

    return fit_table([(c, PRIORITY[c]) for c in COLUMNS], [row_cells(r) for r in runs], width, title=title)


# ---------------------------------------------------------------------- data
def snapshot(c: Client, x: ExperimentInfo) -> RunState:
    """The run as stored now; only the last SPARK_POINTS steps are fetched."""
    r = RunState.of(x)
    steps = c.metrics(x.id, scope="step", names=["lr", "loss"], from_step=max(0, x.last_step - SPARK_POINTS + 1))
    epochs = c.metrics(x.id, scope="epoch", names=["val_top1"])
    for kind, series in (("step", steps), ("epoch", epochs)):
        for ev in _rows_as_events(kind, series):
            r.apply(ev)
    for rec in c.controls(x.id):
        r.set_control(rec)
    return r


def _rows_as_events(kind: str, series: dict[str, dict[str, list]]) -> list[Event]:
    rows: dict[int, Event] = {}
    for key, s in series.items():
        name = key.split("/", 1)[1]
        for step, epoch, value in zip(s["step"], s["epoch"], s["value"]):
            rows.setdefault(step, Event(kind, step=step, epoch=epoch)).values[name] = value
    return [rows[s] for s in sorted(rows)]


def follow(c: Client, r: RunState, lock: threading.Lock) -> None:
    """Apply r's Watch stream from the step after its snapshot until the run ends."""
    try:
        for ev in c.watch(r.id, from_step=r.step + 1):
            with lock:
                r.apply(ev)
    except TrainctlError as exc:
        with lock:
            r.error = exc.code


def snapshots(c: Client, ids: list[int]) -> list[RunState]:
    """The given runs, or every queued and running one."""
    xs = [c.get(i) for i in ids] if ids else sorted(c.list(states=ACTIVE, limit=1000), key=lambda x: x.id)
    return [snapshot(c, x) for x in xs]


def run_top(c: Client, ids: list[int], *, once: bool, console: Console) -> list[RunState]:
    runs = snapshots(c, ids)
    title = f"trainctl top — {c.address}"
    if once or not runs:
        if not runs:
            console.print("no queued or running experiments")
        elif console.is_terminal:
            console.print(runs_table(runs, title, console.width), crop=True)
        else:  # a pipe: every value in full
            Console(file=console.file, width=100_000, color_system=None).print(runs_table(runs, title), crop=False)
        return runs
    lock = threading.Lock()
    for r in runs:
        threading.Thread(target=follow, args=(c, r, lock), name=f"watch-{r.id}", daemon=True).start()

    def frame():
        with lock:
            return Group(runs_table(runs, title, console.width), Text("q or Ctrl-C to quit", style="dim"))

    with Live(get_renderable=frame, console=console, screen=console.is_terminal, refresh_per_second=4):
        _wait_for_quit()
    return runs


def _wait_for_quit() -> None:
    """Until `q` (when stdin is a terminal) or Ctrl-C."""
    if not sys.stdin.isatty():
        while True:  # Ctrl-C only; a timed wait keeps the main thread interruptible
            threading.Event().wait(1.0)
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)  # keys without Enter; Ctrl-C still raises KeyboardInterrupt
        while True:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready and os.read(fd, 1) in (b"q", b"Q"):
                return
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
