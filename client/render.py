"""Terminal rendering for the CLI: tables, and the live progress view of `watch`."""
from __future__ import annotations

import json
import math
import time
from typing import Iterable, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from trainctl.client.sdk import ControlResult, Event, ExperimentInfo

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

STATE_STYLE = {"QUEUED": "yellow", "ASSIGNED": "cyan", "RUNNING": "bold cyan", "COMPLETED": "green",
               "FAILED": "bold red", "CANCELLED": "magenta"}


def _when(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def experiments_table(xs: list[ExperimentInfo]) -> Table:
    t = Table(box=None, header_style="bold")
    for col in ("ID", "NAME", "STATE", "MODEL", "STEP", "VAL TOP-1", "CREATED", "WORKER"):
        t.add_column(col)
    for x in xs:
        acc = x.summary.get("val_top1")
        t.add_row(str(x.id), x.name, f"[{STATE_STYLE.get(x.state, '')}]{x.state}[/]",
                  x.spec.get("model", {}).get("name", "?"), str(x.last_step),
                  f"{acc:.4f}" if acc is not None else "-", _when(x.created_at), x.worker_id or "-")
    return t


def experiment_detail(x: ExperimentInfo, controls: list[ControlResult]) -> None:
    console.print(f"[bold]experiment {x.id}[/] {x.name}  [{STATE_STYLE.get(x.state, '')}]{x.state}[/]"
                  f"  attempt {x.attempt}  worker {x.worker_id or '-'}")
    console.print(f"created {_when(x.created_at)}  started {_when(x.started_at)}  finished {_when(x.finished_at)}")
    if x.message:
        console.print(f"message: {x.message}")
    if x.summary:
        console.print("summary: " + "  ".join(f"{k}={_fmt(v)}" for k, v in sorted(x.summary.items())))
    if controls:
        console.print(controls_table(controls))


def controls_table(recs: list[ControlResult]) -> Table:
    t = Table(title="control log", box=None, header_style="bold")
    for col in ("KIND", "VALUE", "STATUS", "SOURCE", "STEP", "OLD", "NEW", "MESSAGE"):
        t.add_column(col)
    for r in recs:
        step = r.applied_step if r.applied_step is not None else (f"@{r.at_step}" if r.at_step is not None else "-")
        t.add_row(r.kind, _fmt(r.value), r.status, r.source, str(step), _fmt(r.old_value), _fmt(r.new_value),
                  r.message)
    return t


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def control_line(r: ControlResult) -> str:
    if r.status == "APPLIED":
        return (f"{r.kind} {r.value:g} applied at step {r.applied_step}: "
                f"{_fmt(r.old_value)} -> {_fmt(r.new_value)}")
    if r.status == "REJECTED":
        return f"{r.kind} {r.value:g} rejected: {r.message}"
    return f"{r.kind} {r.value:g} pending (will apply when the run picks it up)"


def event_json(ev: Event) -> str:
    if ev.kind == "experiment":
        x = ev.experiment
        return json.dumps({"event": "experiment", "id": x.id, "state": x.state, "attempt": x.attempt,
                           "message": x.message, "summary": x.summary})
    if ev.kind == "control":
        return json.dumps({"event": "control", **ev.control.__dict__})
    return json.dumps({"event": ev.kind, "step": ev.step, "epoch": ev.epoch, "wall_time": ev.wall_time,
                       **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in ev.values.items()}})


def live_view(events: Iterable[Event], *, epochs: int, steps_total: Optional[int] = None) -> Optional[ExperimentInfo]:
    """A progress bar with epoch/step, LR, loss and accuracy; epoch summaries and control
    events print above it. Returns the experiment as last seen."""
    last: Optional[ExperimentInfo] = None
    with Progress(TextColumn("[bold]{task.fields[state]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("ep {task.fields[epoch]}/{task.fields[epochs]}  lr {task.fields[lr]}  "
                             "loss {task.fields[loss]}  acc {task.fields[acc]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("run", total=steps_total, state="…", epoch=0, epochs=epochs, lr="-", loss="-",
                                 acc="-")
        for ev in events:
            if ev.kind == "experiment":
                last = ev.experiment
                progress.update(task, state=last.state)
                if last.is_final:
                    break
            elif ev.kind == "step":
                progress.update(task, completed=ev.step + 1, epoch=ev.epoch + 1,
                                lr=f"{ev.values.get('lr', math.nan):.4g}", loss=f"{ev.values.get('loss', math.nan):.4f}",
                                acc=f"{ev.values.get('acc', math.nan):.3f}")
            elif ev.kind == "epoch":
                v = ev.values
                progress.console.print(
                    f"epoch {ev.epoch + 1:>3}  train_loss {v.get('train_loss', math.nan):.4f}  "
                    f"val_loss {v.get('val_loss', math.nan):.4f}  val_top1 {v.get('val_top1', math.nan):.4f}"
                    + (f"  ema_val_top1 {v['ema_val_top1']:.4f}" if "ema_val_top1" in v else ""))
            elif ev.kind == "control":
                progress.console.print(f"[bold yellow]control[/] {control_line(ev.control)}")
    return last
