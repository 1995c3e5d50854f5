"""`trainctl export-tb`: an experiment's stored metrics as TensorBoard event files.

Written with the `tensorboard` package's own event-file writer (no TensorFlow, no
torch). Scalars are classic `simple_value` summaries, i.e. float32: TensorBoard's
default (Rust) loader shows nothing for float64 scalar tensors, and it keeps scalars
as float32 anyway. Controls and the spec are text-plugin summaries.

Each point carries its real wall time (when the worker produced the row): GetMetrics
series have none, so they come from the Watch history rows (`Client.history`).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from trainctl.client.sdk import Client, ControlResult, ExperimentInfo

_TEXT = text_metadata.create_summary_metadata(display_name="", description="")


def run_dir(logdir: str | Path, x: ExperimentInfo) -> Path:
    """One TensorBoard run per experiment, so several exports share a --logdir."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", x.name).strip("_") or "run"
    return Path(logdir) / f"{x.id}-{name}"


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> event_pb2.Event:
    v = summary_pb2.Summary.Value(tag=tag, simple_value=value)
    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(value=[v]))


def text_event(tag: str, text: str, step: int, wall_time: float) -> event_pb2.Event:
    # A 0-d string: TensorBoard shows a paragraph (a 1-d one would be a one-cell table).
    t = tensor_pb2.TensorProto(dtype="DT_STRING", string_val=[text.encode()],
                               tensor_shape=tensor_shape_pb2.TensorShapeProto())
    v = summary_pb2.Summary.Value(tag=tag, tensor=t, metadata=_TEXT)
    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(value=[v]))


def control_text(r: ControlResult) -> str:
    head = f"{r.kind.lower()} {r.value:g} ({r.source.lower()}) {r.status.lower()}"
    if r.status == "APPLIED" and r.old_value is not None and r.new_value is not None:
        return f"{head} at step {r.applied_step}: {r.old_value:.6g} -> {r.new_value:.6g}"
    return head + (f": {r.message}" if r.message else "")


def export(x: ExperimentInfo, series: dict[str, dict[str, list]], controls: list[ControlResult],
           logdir: str | Path, wall_times: Optional[dict[tuple[str, int], float]] = None) -> dict:
    """Write one run directory; returns what was written (for the CLI and --json).
    wall_times: {("step"|"epoch", step): unix seconds}; a point without one gets the
    run's start. Nothing is written when there is nothing to export."""
    applied = [r for r in controls if r.status != "PENDING"]
    if not any(s["step"] for s in series.values()) and not applied:
        return {"id": x.id, "logdir": str(run_dir(logdir, x)), "tags": [], "points": 0, "controls": 0,
                "state": x.state}
    wall_times = wall_times or {}
    out = run_dir(logdir, x)
    out.mkdir(parents=True, exist_ok=True)
    # Re-exporting replaces the previous export instead of doubling every point.
    for old in out.glob("events.out.tfevents.*"):
        old.unlink()
    t0 = x.started_at or x.created_at or time.time()
    events = [(0, text_event("spec", "```json\n" + json.dumps(x.spec, indent=2) + "\n```", 0, t0))]
    for key, s in series.items():
        tag, scope = _tag(key), key.split("/", 1)[0].lower()
        events += [(step, scalar_event(tag, value, step, wall_times.get((scope, step), t0)))
                   for step, value in zip(s["step"], s["value"])]
    points = len(events) - 1
    for r in applied:
        step = r.applied_step if r.applied_step is not None else (r.at_step or 0)
        events.append((step, text_event("controls", control_text(r), step, r.applied_at or t0)))
    # Globally in step order: TensorBoard's loader takes a step that goes backwards as a
    # restarted run and drops everything after it ("orphaned data"), across all tags.
    events.sort(key=lambda se: se[0])
    writer = EventFileWriter(str(out), max_queue_size=1024, flush_secs=3600)
    try:
        for _, ev in events:
            writer.add_event(ev)
    finally:
        writer.close()
    return {"id": x.id, "logdir": str(out), "tags": sorted(_tag(k) for k in series), "points": points,
            "controls": len(applied), "state": x.state}


def _tag(key: str) -> str:
    scope, name = key.split("/", 1)  # "STEP/lr" -> "step/lr"
    return f"{scope.lower()}/{name}"


def export_experiment(client: Client, id: int, logdir: str | Path, *, names: Optional[list[str]] = None) -> dict:
    x = client.get(id)
    series = client.metrics(id, names=names)
    times = {(ev.kind, ev.step): ev.wall_time for ev in client.history(id) if ev.kind in ("step", "epoch")} \
        if series else {}
    return export(x, series, client.controls(id), logdir, times)

