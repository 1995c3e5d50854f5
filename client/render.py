"""Terminal rendering for the CLI: tables, and the live progress view of `watch`.
Conventions (epoch numbers, times, table fitting) are in output.py."""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Iterable, Optional

from rich.console import Console
from rich.text import Text

from trainctl.client.output import cli_summary, cli_value, epoch_number, isatty, iso, jsonable, print_table
from trainctl.client.sdk import ControlResult, Event, ExperimentInfo


# Into a pipe or file a line is written whole (rich would fold it at 80 columns).
console = Console(highlight=False, soft_wrap=not isatty(sys.stdout))
err_console = Console(stderr=True, highlight=False, soft_wrap=not isatty(sys.stderr))

STATE_STYLE = {"QUEUED": "yellow", "ASSIGNED": "cyan", "RUNNING": "bold cyan", "COMPLETED": "green",
               "FAILED": "bold red", "CANCELLED": "magenta"}

# (header, priority): the lowest priority is dropped first when the terminal is narrow
EXPERIMENT_COLUMNS = (("ID", 9), ("NAME", 8), ("STATE", 9), ("MODEL", 3), ("STEP", 5), ("VAL TOP-1", 6),
                      ("CREATED", 2), ("WORKER", 1))
CONTROL_COLUMNS = (("STEP", 9), ("KIND", 9), ("VALUE", 8), ("STATUS", 8), ("SOURCE", 3), ("OLD", 5), ("NEW", 6),
                   ("MESSAGE", 4))


def _when(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def experiment_rows(xs: list[ExperimentInfo]) -> list[list]:
    rows = []
    for x in xs:
        acc = x.summary.get("val_top1")
        rows.append([str(x.id), x.name, Text(x.state, style=STATE_STYLE.get(x.state, "")),
                     x.spec.get("model", {}).get("name", "?"), str(x.last_step),
                     f"{acc:.4f}" if acc is not None else "-", _when(x.created_at), x.worker_id or "-"])
    return rows


def print_experiments(xs: list[ExperimentInfo], con: Optional[Console] = None) -> None:
    print_table(con or console, EXPERIMENT_COLUMNS, experiment_rows(xs))


def experiment_detail(x: ExperimentInfo, controls: list[ControlResult], last_lines: list[str] = ()) -> None:
    """`last_lines`: a FAILED run's last stderr lines (client/logs_cmd.last_error_lines)."""
    console.print(f"[bold]experiment {x.id}[/] {x.name}  [{STATE_STYLE.get(x.state, '')}]{x.state}[/]"
                  f"  attempt {x.attempt}  worker {x.worker_id or '-'}")
    if x.kind != "SPEC":
        console.print(f"kind {x.kind}")
    if x.kind == "CODE":  # the user's command on their uploaded folder
        console.print(Text(f"command: {x.spec.get('command', '-')}"))
        console.print(f"code: {x.code_sha256[:12] or '(none: an empty folder)'}")
    if x.replay_of:
        console.print(f"replay of #{x.replay_of} (its spec and recorded control log)")
    console.print(f"created {_when(x.created_at)}  started {_when(x.started_at)}  finished {_when(x.finished_at)}")
    if x.tags:
        console.print("tags: " + ", ".join(x.tags))
    if x.note:
        console.print(f"note: {x.note}")
    if x.message:
        console.print(f"message: {x.message}")
    if last_lines:
        console.print(f"[bold]last lines of its output[/] (trainctl logs {x.id} for all)")
        for line in last_lines:
            console.print(Text("  " + line))  # the user's text: never read as markup
    if x.knobs:
        console.print("knobs: " + "  ".join(_knob(k) for k in x.knobs))
    if x.summary:
        console.print("summary: " + "  ".join(f"{k}={_fmt(v)}" for k, v in sorted(cli_summary(x.summary).items())))
    if controls:
        console.print("[bold]control log[/]")
        print_table(console, CONTROL_COLUMNS, [control_cells(r) for r in controls_in_order(controls)])


def _knob(k: dict) -> str:
    lo, hi = k.get("low"), k.get("high")
    bounds = f" [{_fmt(lo) if lo is not None else '-inf'}, {_fmt(hi) if hi is not None else 'inf'}]" \
        if lo is not None or hi is not None else ""
    return f"{k['name']}={_fmt(k['value'])}{bounds}"


def _acts_at(r: ControlResult) -> Optional[int]:
    """The step a control acts at: applied, else scheduled (None: neither)."""
    return r.applied_step if r.applied_step is not None else r.at_step


def controls_in_order(recs: list[ControlResult]) -> list[ControlResult]:
    """By the step they act at (applied, else scheduled), then by request time."""
    def key(r: ControlResult):
        step = _acts_at(r)
        return (math.inf if step is None else step, r.requested_at or 0.0)

    return sorted(recs, key=key)


def control_cells(r: ControlResult) -> list[str]:
    step = r.applied_step if r.applied_step is not None else (f"@{r.at_step}" if r.at_step is not None else "-")
    msg = "  ".join(m for m in (r.message, r.consequence) if m)
    return [str(step), r.kind + (" hold" if r.hold else ""), _fmt(r.value), r.status, r.source,
            _fmt(r.old_value), _fmt(r.new_value), msg or "-"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def control_line(r: ControlResult) -> str:
    tail = f"; {r.consequence}" if r.consequence else ""
    if r.status == "APPLIED":
        return (f"{r.kind} {r.value:g} applied at step {r.applied_step}: "
                f"{_fmt(r.old_value)} -> {_fmt(r.new_value)}{tail}")
    if r.status == "REJECTED":
        return f"{r.kind} {r.value:g} rejected: {r.message}"
    if r.status == "EXPIRED":
        return f"{r.kind} {r.value:g} expired: {r.message or 'the run ended before it applied'}"
    return f"{r.kind} {r.value:g} pending (will apply when the run picks it up){tail}"


def event_json(ev: Event) -> str:
    """One line of `watch --json`: epoch numbers and ISO times as everywhere in the CLI."""
    if ev.kind == "experiment":
        x = ev.experiment
        return json.dumps(jsonable({"event": "experiment", "id": x.id, "state": x.state, "attempt": x.attempt,
                                    "message": x.message, "summary": cli_summary(x.summary)}), allow_nan=False)
    if ev.kind == "control":
        return json.dumps({"event": "control", **jsonable(ev.control)}, allow_nan=False)
    return json.dumps(jsonable({"event": ev.kind, "step": ev.step, "epoch": epoch_number(ev.epoch),
                                "wall_time": iso(ev.wall_time),
                                **{k: cli_value(k, v) for k, v in ev.values.items()}}), allow_nan=False)


def epoch_line(ev: Event) -> str:
    v = ev.values
    return (f"epoch {epoch_number(ev.epoch):>3}  train_loss {v.get('train_loss', math.nan):.4f}  "
            f"val_loss {v.get('val_loss', math.nan):.4f}  val_top1 {v.get('val_top1', math.nan):.4f}"
            + (f"  ema_val_top1 {v['ema_val_top1']:.4f}" if "ema_val_top1" in v else ""))


class _ControlOrder:
    """Prints control events in step order: the Watch history sends every stored row
    before the control log, so a control is held until the rows reach its step."""

    def __init__(self, known: list[ControlResult]):
        self.waiting = [r for r in controls_in_order(known) if r.status != "PENDING"]
        self.printed: set[tuple[str, str]] = set()

    def due(self, step: Optional[int]) -> list[ControlResult]:
        out = []
        for r in list(self.waiting):
            at = _acts_at(r)
            if step is None or (at is not None and at <= step):
                self.waiting.remove(r)
                out.append(r)
        return [r for r in out if self._first(r)]

    def event(self, r: ControlResult, step: int) -> list[ControlResult]:
        at = _acts_at(r)
        if at is not None and at > step and r.status != "PENDING":
            if (r.command_id, r.status) not in self.printed and r not in self.waiting:
                self.waiting.append(r)
                self.waiting = controls_in_order(self.waiting)
            return []
        return [r] if self._first(r) else []

    def _first(self, r: ControlResult) -> bool:
        key = (r.command_id, r.status)
        if key in self.printed:
            return False
        self.printed.add(key)
        return True


def live_view(events: Iterable[Event], *, epochs: int, steps_total: Optional[int] = None,
              experiment: Optional[ExperimentInfo] = None,
              controls: Optional[list[ControlResult]] = None) -> Optional[ExperimentInfo]:
    """A progress bar with epoch/step, LR, loss and accuracy; epoch lines and control
    events (in step order) print above it, history first, then live. The bar's total is
    the run's step count when known and its clock counts from the run's start. Returns
    the experiment as last seen."""
    # rich.progress costs a fifth of `trainctl get`'s start: only watch needs it
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    last: Optional[ExperimentInfo] = experiment
    order = _ControlOrder(controls or [])
    step = -1
    with Progress(TextColumn("[bold]{task.fields[state]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("ep {task.fields[epoch]}/{task.fields[epochs]}  lr {task.fields[lr]}  "
                             "loss {task.fields[loss]}  acc {task.fields[acc]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("run", total=steps_total, state=last.state if last else "…", epoch=0,
                                 epochs=epochs, lr="-", loss="-", acc="-")
        _start_clock(progress, task, last)

        def say(rs: list[ControlResult]) -> None:
            for r in rs:
                progress.console.print(f"[bold yellow]control[/] {control_line(r)}")

        for ev in events:
            if ev.kind == "experiment":
                last = ev.experiment
                progress.update(task, state=last.state)
                _start_clock(progress, task, last)
            elif ev.kind == "step":
                say(order.due(ev.step))
                step = max(step, ev.step)
                progress.update(task, completed=ev.step + 1, epoch=epoch_number(ev.epoch),
                                lr=f"{ev.values.get('lr', math.nan):.4g}",
                                loss=f"{ev.values.get('loss', math.nan):.4f}",
                                acc=f"{ev.values.get('acc', math.nan):.3f}")
            elif ev.kind == "epoch":
                say(order.due(ev.step - 1))
                progress.console.print(epoch_line(ev))
                if progress.tasks[0].total is None and epochs:
                    # an epoch row sits at the step count after its epoch: steps per epoch
                    progress.update(task, total=ev.step // (ev.epoch + 1) * epochs)
            elif ev.kind == "control":
                say(order.event(ev.control, step))
        say(order.due(None))
        if last is not None and last.is_final:
            steps = last.summary.get("steps")
            if isinstance(steps, int) and steps > 0:
                progress.update(task, total=steps, completed=steps if last.state == "COMPLETED" else step + 1)
            _start_clock(progress, task, last)
    return last


def _start_clock(progress, task_id, x: Optional[ExperimentInfo]) -> None:
    """The elapsed column counts from the run's start (and stops at its end), not the
    watch's: rich measures with progress.get_time(), a monotonic clock."""
    if x is None or not x.started_at:
        return
    task = progress._tasks[task_id]
    now_mono, now_wall = progress.get_time(), time.time()
    task.start_time = now_mono - (now_wall - x.started_at)
    if x.is_final and x.finished_at:
        task.stop_time = task.start_time + max(0.0, x.finished_at - x.started_at)
