"""`trainctl schedule preview`: the LR at every step of a spec, without training.

The curve comes from the schedule code the worker runs, driven in the loop's order
(trainctl/schedules/API.md): per step, the spec's `control:` entries due at
that step are applied first, then `lr_at(step)` is read; after an epoch's last step
`on_epoch_end` is called (with the constant metrics `schedulers.preview` uses, so a
plateau schedule decays every `patience + 1` epochs).

A control the worker would refuse (say `set_lr_decay` on a schedule without a decay
factor) is refused here too, with the worker's message, and leaves the curve as it
is, as it does in a real run. `set_ema_decay` / `set_weight_decay` do not touch the
LR: they are listed (and marked on the plot) but change nothing.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from trainctl.spec import Spec, SpecError, check_control_value, load_spec_file, parse_spec
from trainctl.controls import SCHEDULE_VERBS
from trainctl.schedules import apply_control, build_schedule, consequence
from trainctl.schedules.factory import _ConstantMetrics

SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class ControlOutcome:
    """One spec `control:` entry as the preview ran it."""

    at_step: int
    verb: str
    value: float
    status: str                    # APPLIED | REJECTED | NOT_LR (no LR effect) | NEVER (past the last step)
    old_value: Optional[float] = None
    new_value: Optional[float] = None
    message: str = ""
    consequence: str = ""          # what it means ahead: the words the worker's ack carries

    @property
    def label(self) -> str:
        return f"{self.verb} {self.value:g}"


@dataclass
class Preview:
    name: str
    schedule: str                  # schedule name, e.g. "cosine"
    summary: str                   # "cosine(warmup_epochs=1, min_lr=0.0001)": the fields the spec set
    base_lr: float
    steps_per_epoch: int
    steps_per_epoch_source: str    # "dataset" | "--steps-per-epoch"
    epochs: int
    lr: list[float]
    controls: list[ControlOutcome] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "schedule": self.schedule, "summary": self.summary, "base_lr": self.base_lr,
                "steps_per_epoch": self.steps_per_epoch, "steps_per_epoch_source": self.steps_per_epoch_source,
                "epochs": self.epochs, "total_steps": self.total_steps,
                "controls": [asdict(c) for c in self.controls], "lr": self.lr}

    def epoch_rows(self) -> list[tuple[int, float, float, float, float]]:
        """(epoch 1-based, first-step LR, last-step LR, min, max) per epoch."""
        spe = self.steps_per_epoch
        rows = []
        for e in range(self.epochs):
            chunk = self.lr[e * spe:(e + 1) * spe]
            rows.append((e + 1, chunk[0], chunk[-1], min(chunk), max(chunk)))
        return rows


# ---------------------------------------------------------------------- inputs
def load_spec(spec: Union[str, Path, dict]) -> Spec:
    """Parse a spec file or dict; SpecError (field path in the message) when invalid.
    The model name is not checked against timm: the preview does not need the model."""
    data = spec if isinstance(spec, dict) else load_spec_file(spec)
    return parse_spec(data, check_model=False)


def dataset_steps_per_epoch(spec: Spec) -> int:
    """Optimizer steps per epoch as the worker counts them (`TrainParams.steps_per_epoch`
    over the real train loader). Known from the dataset's size where it is fixed
    (digits, synthetic: `datasize`), so nothing is loaded and torch is not imported;
    counted from the real loader otherwise (imagefolder)."""
    from trainctl.datasize import steps_per_epoch as known

    try:
        spe = known(spec)
    except ValueError as exc:
        raise SpecError([str(exc)]) from None
    if spe is not None:
        return spe
    from trainctl.workers.engine.data import DataError, build_data

    tp = spec.train
    try:
        data = build_data(spec.data, seed=tp.seed)
    except DataError as exc:
        raise SpecError([str(exc)]) from None
    try:
        return tp.steps_per_epoch(len(data.train), spec.data.batch_size)
    except ValueError as exc:
        raise SpecError([str(exc)]) from None


def schedule_summary(spec: Spec) -> str:
    """The schedule name with the parameters the spec set (defaults left out)."""
    p = spec.schedule
    fields = p.model_dump(exclude_defaults=True, exclude={"name"})

    def fmt(v: Any) -> str:
        if isinstance(v, dict) and "name" in v:      # gradual_warmup's `after:`
            inner = ", ".join(f"{k}={fmt(x)}" for k, x in v.items() if k != "name")
            return f"{v['name']}({inner})"
        if isinstance(v, float):
            return f"{v:g}"
        return str(v)

    if "after" in fields:  # keep the nested schedule's name even when it equals a default
        fields["after"] = {"name": p.after.name, **p.after.model_dump(exclude_defaults=True, exclude={"name"})}
    return f"{p.name}(" + ", ".join(f"{k}={fmt(v)}" for k, v in fields.items()) + ")"


def known_total_steps(spec: dict) -> Optional[int]:
    """Optimizer steps of a whole run when the spec alone tells (for the watch bar's
    total), else None. Never loads data."""
    try:
        from trainctl.datasize import steps_per_epoch as known

        parsed = load_spec(spec)
        spe = known(parsed)
        return spe * parsed.train.epochs if spe else None
    except Exception:  # a bar without a total is fine; a crash here is not
        return None


# ---------------------------------------------------------------------- the run
def preview_spec(spec: Union[Spec, str, Path, dict], *, steps_per_epoch: Optional[int] = None) -> Preview:
    """The LR curve of a spec with its `control:` entries applied.

    steps_per_epoch: None = count them from the dataset (as the worker does); an int
    is used as is (optimizer steps per epoch, max_steps_per_epoch not applied again).
    """
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    if steps_per_epoch is None:
        spe, source = dataset_steps_per_epoch(spec), "dataset"
    else:
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise SpecError([f"--steps-per-epoch: must be an int >= 1, got {steps_per_epoch!r}"])
        spe, source = steps_per_epoch, "--steps-per-epoch"
    epochs = spec.train.epochs
    total = spe * epochs
    if total > 50_000_000:
        raise SpecError([f"train.epochs: {epochs} epochs x {spe} steps is {total} steps; "
                         "the preview stops at 50,000,000"])

    schedule = build_schedule(spec.schedule, base_lr=spec.optimizer.lr, steps_per_epoch=spe, epochs=epochs)
    outcomes = [ControlOutcome(c.at_step, c.verb, c.value, "NEVER" if c.at_step >= total else "PENDING")
                for c in spec.control]
    due: dict[int, list[ControlOutcome]] = {}
    for o in outcomes:
        if o.status == "PENDING":
            due.setdefault(o.at_step, []).append(o)   # spec order within a step, as the worker
    metrics = _ConstantMetrics()
    lr: list[float] = []
    for s in range(total):
        for o in due.get(s, ()):
            _apply(schedule, s, o)
        lr.append(schedule.lr_at(s))
        if (s + 1) % spe == 0:
            schedule.on_epoch_end(s // spe, metrics(s // spe))
    for o in outcomes:
        if o.status == "NEVER":
            o.message = f"after the last step ({total - 1})"
    return Preview(name=spec.name, schedule=spec.schedule.name, summary=schedule_summary(spec),
                   base_lr=spec.optimizer.lr, steps_per_epoch=spe, steps_per_epoch_source=source,
                   epochs=epochs, lr=lr, controls=outcomes)


def _apply(schedule, step: int, o: ControlOutcome) -> None:
    if o.verb not in SCHEDULE_VERBS:
        o.status, o.message = "NOT_LR", "no effect on the LR"
        return
    try:
        check_control_value(o.verb, o.value)
        o.old_value, o.new_value = apply_control(schedule, step, o.verb, o.value)
        o.status = "APPLIED"
        o.consequence = consequence(schedule, step, o.verb)
    except ValueError as exc:      # NoDecayFactor included: the worker refuses it the same way
        o.status, o.message = "REJECTED", str(exc)


# ---------------------------------------------------------------------- text
def sparkline(values: list[float], width: int = 64) -> str:
    """One unicode block per column; a column shows the mean of its steps."""
    if not values:
        return ""
    n = len(values)
    width = min(width, n)
    cols = []
    for i in range(width):
        a, b = i * n // width, max((i + 1) * n // width, i * n // width + 1)
        chunk = values[a:b]
        cols.append(sum(chunk) / len(chunk))
    lo, hi = min(cols), max(cols)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo <= 1e-12 * max(abs(hi), 1e-300):
        return SPARK[3] * width
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / (hi - lo) * len(SPARK)))] for v in cols)


def _epoch_groups(p: Preview, max_rows: int) -> list[tuple[str, float, float, float, float]]:
    rows = p.epoch_rows()
    if len(rows) <= max_rows:
        return [(str(e), f, l, lo, hi) for e, f, l, lo, hi in rows]
    size = math.ceil(len(rows) / max_rows)
    out = []
    for i in range(0, len(rows), size):
        g = rows[i:i + size]
        label = f"{g[0][0]}-{g[-1][0]}" if len(g) > 1 else str(g[0][0])
        out.append((label, g[0][1], g[-1][2], min(r[3] for r in g), max(r[4] for r in g)))
    return out


def render_text(p: Preview, console=None, *, max_rows: int = 30) -> None:
    from rich.table import Table

    if console is None:
        from trainctl.client.render import console
    console.print(f"[bold]{p.name}[/]  base_lr {p.base_lr:g}")
    console.print(f"schedule {p.summary}")
    console.print(f"{p.epochs} epochs x {p.steps_per_epoch} steps/epoch (from {p.steps_per_epoch_source})"
                  f" = {p.total_steps} steps")
    t = Table(box=None, header_style="bold")
    for col in ("EPOCH", "FIRST LR", "LAST LR", "MIN", "MAX"):
        t.add_column(col, justify="right")
    for label, first, last, lo, hi in _epoch_groups(p, max_rows):
        t.add_row(label, f"{first:.6g}", f"{last:.6g}", f"{lo:.6g}", f"{hi:.6g}")
    console.print(t)
    console.print(f"LR over {p.total_steps} steps [dim](min {min(p.lr):.4g}, max {max(p.lr):.4g})[/]")
    console.print(sparkline(p.lr, width=max(16, min(64, console.width - 2))))
    if p.controls:
        ct = Table(title="controls", box=None, header_style="bold")
        for col in ("STEP", "EPOCH", "COMMAND", "STATUS", "OLD", "NEW", "NOTE"):
            ct.add_column(col)
        for c in p.controls:
            applied = c.status == "APPLIED"
            ct.add_row(str(c.at_step), f"{c.at_step / p.steps_per_epoch:.2f}", c.label, c.status,
                       f"{c.old_value:.6g}" if applied else "-", f"{c.new_value:.6g}" if applied else "-",
                       c.message or c.consequence)
        console.print(ct)
