"""PNG plots for the CLI (matplotlib, Agg backend: no display needed).

* `preview_png`: a `schedule preview` curve, epochs on the x axis, the spec's control
  entries marked.
* `experiment_png`: an experiment's stored metrics (LR, loss, accuracy against the
  optimizer step) with every applied control event marked.
* `overlay_png`: several experiments on shared panels (`plot 3 4 5`).

Control markers are a vertical line on every panel plus a label at the top of the
first panel; labels that would overlap are stacked in rows, and the panel gets
headroom so they never sit on the curve.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import Bbox, blended_transform_factory  # noqa: E402

MAX_POINTS = 4000
MAX_LABEL_ROWS = 6
LR_VERBS = ("set_lr", "scale_lr", "set_lr_decay")
# one colour per verb, so the same command reads the same on every plot
VERB_COLORS = {"set_lr": "tab:red", "scale_lr": "tab:orange", "set_lr_decay": "tab:purple",
               "set_ema_decay": "tab:green", "set_weight_decay": "tab:brown"}


@dataclass
class Marker:
    x: float
    label: str
    verb: str
    dim: bool = False       # a command that did nothing to the curve (rejected, not an LR verb)


# ---------------------------------------------------------------------- markers
def mark_events(axes: Sequence[Any], markers: Sequence[Marker], *, label_ax: Any = None) -> None:
    """Vertical lines on every axis in `axes`, labels at the top of `label_ax`."""
    if not markers:
        return
    label_ax = label_ax if label_ax is not None else axes[0]
    for m in markers:
        color = VERB_COLORS.get(m.verb, "tab:gray")
        for ax in axes:
            ax.axvline(m.x, color=color, lw=1.1, ls=":" if m.dim else "--", alpha=0.5 if m.dim else 0.85,
                       zorder=1.5)
    _place_labels(label_ax, sorted(markers, key=lambda m: m.x))


def _place_labels(ax, markers: Sequence[Marker]) -> None:
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    ax_box = ax.get_window_extent(renderer)
    row_h_pts = 13
    # sideways: the white box's pad (0.15 x fontsize 8) and a 1.5 pt gap; rows are 13 pt apart,
    # which leaves room above and below a 8 pt label and its box
    pad_px = (0.15 * 8 + 1.5) * fig.dpi / 72
    placed: list[Any] = []
    used_rows = 0
    hidden = 0
    for m in markers:
        color = VERB_COLORS.get(m.verb, "tab:gray")
        text = ax.annotate(m.label, xy=(m.x, 1.0), xycoords=trans, xytext=(3, -4), textcoords="offset points",
                           ha="left", va="top", fontsize=8, color=color, zorder=5, annotation_clip=False,
                           bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
        # right of its line in the first free row; left of it only when no row is free
        for ha, dx in (("left", 3), ("right", -3)):
            ok = False
            for row in range(MAX_LABEL_ROWS):
                text.set_ha(ha)
                text.set_position((dx, -4 - row * row_h_pts))
                # the label's white box, plus a gap, must touch no other label
                t = text.get_window_extent(renderer)
                bb = Bbox.from_extents(t.x0 - pad_px, t.y0 - 0.5, t.x1 + pad_px, t.y1 + 0.5)
                inside = bb.x0 >= ax_box.x0 - 1 and bb.x1 <= ax_box.x1 + 1
                if inside and not any(bb.overlaps(o) for o in placed):
                    ok = True
                    break
            if ok:
                placed.append(bb)
                used_rows = max(used_rows, row + 1)
                break
        else:
            text.remove()
            hidden += 1
    if hidden:
        ax.text(1.0, 1.01, f"+{hidden} more control(s) not labelled", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7, color="dimgray")
    # headroom: the curve stays under the label band
    band = (4 + used_rows * row_h_pts + 4) * fig.dpi / 72 / max(ax_box.height, 1.0)
    band = min(band, 0.6)
    lo, hi = ax.get_ylim()
    if ax.get_yscale() == "log":
        llo, lhi = math.log10(lo), math.log10(hi)
        ax.set_ylim(lo, 10 ** (llo + (lhi - llo) / (1 - band)))
    else:
        ax.set_ylim(lo, lo + (hi - lo) / (1 - band))


def _finish(fig, path: str | Path) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _sci_axis(ax) -> None:
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)


# ---------------------------------------------------------------------- preview
def preview_png(p, path: str | Path, *, dpi: int = 130) -> Path:
    """Plot a `Preview` (client/preview.py) with epochs on the x axis."""
    spe = p.steps_per_epoch
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=dpi, layout="constrained")
    x = [s / spe for s in range(p.total_steps)]
    step_like = p.total_steps <= 400  # few steps: show each as a stair so per-epoch schedules read right
    if step_like:
        ax.step(x, p.lr, where="post", color="tab:blue", lw=1.8, label="learning rate")
    else:
        ax.plot(x, p.lr, color="tab:blue", lw=1.8, label="learning rate")
    ax.set_xlim(0, p.epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_ylim(0, max(p.lr) * 1.05 if max(p.lr) > 0 else 1)
    _sci_axis(ax)
    ax.grid(True, alpha=0.3)
    top = ax.secondary_xaxis("top", functions=(lambda e: e * spe, lambda s: s / spe))
    top.set_xlabel("step", fontsize=9)
    top.tick_params(labelsize=8)
    facts = textwrap.fill(f"{p.summary}, base_lr {p.base_lr:g}, {p.epochs} epochs x {spe} steps", width=110)
    ax.set_title(f"LR schedule preview: {p.name}\n{facts}", fontsize=10)
    markers = []
    for c in p.controls:
        if c.status == "NEVER":
            continue
        note = {"REJECTED": " (rejected)", "NOT_LR": ""}.get(c.status, "")
        markers.append(Marker(c.at_step / spe, c.label + note, c.verb, dim=c.status != "APPLIED"))
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="tab:blue", lw=1.8, label="learning rate")]
    if any(not m.dim for m in markers):
        handles.append(Line2D([], [], color="gray", ls="--", lw=1.1, label="control (applied)"))
    if any(m.dim for m in markers):
        handles.append(Line2D([], [], color="gray", ls=":", lw=1.1, label="control (rejected / no LR effect)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.canvas.draw()  # layout first, so label placement measures the final axes
    mark_events([ax], markers)
    return _finish(fig, path)


# ---------------------------------------------------------------------- experiments
def _series(metrics: dict, key: str):
    s = metrics.get(key)
    if not s or not s["value"]:
        return None
    pts = [(st, v) for st, v in zip(s["step"], s["value"]) if v is not None and math.isfinite(v)]
    if not pts:
        return None
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average (no lag against the raw curve); shrinks at the ends."""
    if window <= 1 or len(values) < 3:
        return values
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    half, n = window // 2, len(values)
    out = []
    for i in range(n):
        a, b = max(0, i - half), min(n, i + half + 1)
        out.append((prefix[b] - prefix[a]) / (b - a))
    return out


def _steps_per_epoch(metrics: dict) -> Optional[int]:
    """Epoch rows are logged at the step count after the epoch: step / (epoch + 1)."""
    s = metrics.get("EPOCH/train_loss") or metrics.get("EPOCH/val_top1")
    if not s or not s["step"]:
        return None
    st, ep = s["step"][0], s["epoch"][0]
    return st // (ep + 1) if st > 0 else None


def experiment_png(x, metrics: dict, controls: Sequence[Any], path: str | Path, *, dpi: int = 130) -> dict:
    """Plot an experiment: `x` an ExperimentInfo, `metrics` Client.metrics(...) output,
    `controls` Client.controls(...). Returns what went on the plot (for --json)."""
    lr = _series(metrics, "STEP/lr")
    step_loss, step_acc = _series(metrics, "STEP/loss"), _series(metrics, "STEP/acc")
    if not (lr or step_loss or step_acc):
        raise ValueError(f"experiment {x.id} has no step metrics yet (state {x.state})")
    fig, (ax_lr, ax_loss, ax_acc) = plt.subplots(3, 1, sharex=True, figsize=(11, 9.5), dpi=dpi,
                                                 layout="constrained", height_ratios=[1, 1.2, 1.2])
    n_pts = max(len(s[0]) for s in (lr, step_loss, step_acc) if s)
    window = max(1, n_pts // 50)
    raw_alpha = 0.3 if window > 1 else 0.75   # faint under a smoothed line, plain on its own
    drawn: list[str] = []

    if lr:
        ax_lr.plot(*lr, color="tab:blue", lw=1.6, label="lr (step)")
        drawn.append("STEP/lr")
        ax_lr.set_ylim(0, max(lr[1]) * 1.05 if max(lr[1]) > 0 else 1)
    ax_lr.set_ylabel("learning rate")
    _sci_axis(ax_lr)

    if step_loss:
        ax_loss.plot(*step_loss, color="tab:blue", lw=0.7 if window > 1 else 1.1, alpha=raw_alpha,
                     label="train loss (batch)")
        if window > 1:
            ax_loss.plot(step_loss[0], _smooth(step_loss[1], window), color="tab:blue", lw=1.4,
                         label=f"train loss (batch, mean of {window})")
        drawn.append("STEP/loss")
    for key, style, color, label in (("EPOCH/train_loss", "o-", "tab:orange", "train loss (epoch)"),
                                     ("EPOCH/val_loss", "s-", "tab:green", "val loss"),
                                     ("EPOCH/ema_val_loss", "^--", "tab:olive", "EMA val loss")):
        s = _series(metrics, key)
        if s:
            ax_loss.plot(*s, style, color=color, lw=1.4, ms=4, label=label)
            drawn.append(key)
    ax_loss.set_ylabel("loss")
    loss_scale = _loss_axis(ax_loss, [v for key in ("STEP/loss", "EPOCH/train_loss", "EPOCH/val_loss",
                                                    "EPOCH/ema_val_loss") if (sr := _series(metrics, key))
                                      for v in sr[1]])

    if step_acc:
        ax_acc.plot(*step_acc, color="tab:blue", lw=0.7 if window > 1 else 1.1, alpha=raw_alpha,
                    label="batch acc")
        if window > 1:
            ax_acc.plot(step_acc[0], _smooth(step_acc[1], window), color="tab:blue", lw=1.4,
                        label=f"batch acc (mean of {window})")
        drawn.append("STEP/acc")
    for key, style, color, label in (("EPOCH/val_top1", "s-", "tab:green", "val top-1"),
                                     ("EPOCH/ema_val_top1", "^--", "tab:olive", "EMA val top-1")):
        s = _series(metrics, key)
        if s:
            ax_acc.plot(*s, style, color=color, lw=1.4, ms=4, label=label)
            drawn.append(key)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_xlabel("step")

    last = max(s[0][-1] for s in (lr, step_loss, step_acc) if s)
    ax_acc.set_xlim(0, max(last + 1, 1))
    for ax in (ax_lr, ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
    spe = _steps_per_epoch(metrics)
    if spe:
        top = ax_lr.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
        top.set_xlabel("epoch", fontsize=9)
        top.tick_params(labelsize=8)

    acc = x.summary.get("val_top1")
    sched = (x.spec.get("schedule") or {}).get("name")
    facts = ([f"schedule {sched}"] if sched else []) + ([f"lr {_fmt_lr(x.spec)}"] if _fmt_lr(x.spec) else []) \
        + ([f"val top-1 {acc:.4f}"] if acc is not None else [])
    ax_lr.set_title(f"experiment {x.id}: {x.name}  [{x.state}]" + ("\n" + ", ".join(facts) if facts else ""),
                    fontsize=10)

    markers = [Marker(r.applied_step, f"{r.kind.lower()} {r.value:g}", r.kind.lower())
               for r in controls if r.status == "APPLIED" and r.applied_step is not None]
    for ax in (ax_lr, ax_loss, ax_acc):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.canvas.draw()  # layout first, so label placement measures the final axes
    mark_events([ax_lr, ax_loss, ax_acc], markers, label_ax=ax_lr)
    _finish(fig, path)
    return {"id": x.id, "png": str(path), "series": drawn, "points": n_pts, "loss_scale": loss_scale,
            "controls": [{"applied_step": m.x, "label": m.label} for m in markers]}


def _loss_axis(ax, values: list[float]) -> str:
    """A loss panel one outlier cannot flatten (a first-epoch val_loss of 11 over batch
    losses near 1): a log axis when the losses span more than a decade and are all
    positive, else a linear one cut at a robust top (above the 98th percentile) with the
    points above it counted in a note. Returns "log" | "linear"."""
    vals = sorted(v for v in values if math.isfinite(v))
    if len(vals) < 2:
        return "linear"
    lo, hi = vals[0], vals[-1]
    if lo > 0 and hi / lo > 10:
        ax.set_yscale("log")
        return "log"
    q = vals[min(len(vals) - 1, int(0.98 * len(vals)))]
    top = q + 0.25 * (q - lo) if q > lo else hi
    if hi > top and (hi - lo) > 3 * (top - lo):
        ax.set_ylim(min(lo, 0.0) if lo >= 0 else lo * 1.05, top)
        above = sum(v > top for v in vals)
        ax.text(0.99, 0.98, f"{above} point(s) above the axis (max {hi:.4g})", transform=ax.transAxes,
                ha="right", va="top", fontsize=7, color="dimgray")
    return "linear"


# ---------------------------------------------------------------------- plot 3 4 5 (overlay)
OVERLAY_PANELS = (("STEP/lr", "learning rate"), ("STEP/loss", "train loss (step)"), ("EPOCH/val_top1", "val_top1"))


def overlay_png(xs, metrics: list[dict], controls: list[list], path: str) -> dict:
    """Several experiments on shared panels (LR, loss, val_top1 against the step), one
    colour per run, each run's applied controls marked in its colour. Returns what was
    drawn (for --json)."""
    panels = [(k, t) for k, t in OVERLAY_PANELS if any(_series(m, k) for m in metrics)]
    if not panels:
        raise ValueError("none of these experiments has lr, loss or val_top1 stored yet")
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.8 * len(panels)), sharex=True, squeeze=False)
    axes = [a[0] for a in axes]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = {"experiments": [x.id for x in xs], "series": [k for k, _ in panels], "controls": []}
    for i, (x, m, cs) in enumerate(zip(xs, metrics, controls)):
        color = colors[i % len(colors)]
        for ax, (key, title) in zip(axes, panels):
            s = _series(m, key)
            if s:
                ax.plot(*s, color=color, lw=1.2, marker="o" if key.startswith("EPOCH") else None, ms=3,
                        label=f"{x.id} {x.name}")
            ax.set_title(title, fontsize=10, loc="left")
        for r in cs:
            if r.status == "APPLIED" and r.applied_step is not None:
                for ax in axes:
                    ax.axvline(r.applied_step, color=color, ls="--", lw=1, alpha=0.8)
                axes[0].annotate(f"{x.id}: {r.kind} {r.value:g}", (r.applied_step, 1), xycoords=("data", "axes fraction"),
                                 xytext=(3, -12 - 11 * (len(drawn["controls"]) % 4)), textcoords="offset points",
                                 fontsize=7, color=color)
                drawn["controls"].append({"id": x.id, "kind": r.kind, "value": r.value, "step": r.applied_step})
    axes[0].legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("step")
    _finish(fig, path)
    return drawn


def _fmt_lr(spec: dict) -> str:
    v = (spec.get("optimizer") or {}).get("lr")
    return f"{v:g}" if isinstance(v, (int, float)) else ""
