"""What an LR command means ahead, in words: the one function behind the worker's ack
(``ControlAck.consequence``), the server's ``dry_run`` answer and ``schedule preview``.

It reads the schedule *after* the command was applied at ``step`` (so the same call
serves a real command and a dry run on a rebuilt schedule) and summarises the rest of
the run: where a warmup now peaks, the final LR, the next decay. The curve is read with
``lr_at``, the function the loop uses, at every remaining step when there are at most
``EXACT_STEPS`` of them, otherwise on an even grid plus the steps where the shape
changes (warmup end, restarts are found by the grid), which keeps it in milliseconds for
any run length.
"""
from __future__ import annotations

import math
from typing import Optional

from trainctl.controls import SCHEDULE_VERBS

from .base import Schedule

EXACT_STEPS = 20_000


def fmt(v: float) -> str:
    """Three significant digits, the way people read LRs (0.19, 1.9e-04 -> 0.00019)."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    return f"{v:.3g}"


def warmup_end(schedule: Schedule, step: int) -> Optional[int]:
    """The first step >= ``step`` outside the warmup, or None if ``step`` is not in it
    (``in_warmup`` is monotone, so a bisection finds it)."""
    if not schedule.in_warmup(step):
        return None
    lo, hi = step, schedule.total_steps  # in_warmup(lo) is True; hi may be past the end
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if schedule.in_warmup(mid):
            lo = mid
        else:
            hi = mid
    return hi


def _steps(schedule: Schedule, start: int, last: int) -> list[int]:
    n = last - start + 1
    if n <= EXACT_STEPS:
        return list(range(start, last + 1))
    stride = n / EXACT_STEPS
    grid = {start + int(i * stride) for i in range(EXACT_STEPS)} | {last}
    w = warmup_end(schedule, start)
    if w is not None:
        grid |= {k for k in (w - 1, w, w + 1) if start <= k <= last}
    return sorted(grid)


def next_decay(schedule: Schedule, step: int) -> Optional[int]:
    """First step after ``step`` at which a decay happens (decay counts never go down, so
    bisect), or None. Plateau reductions depend on metrics: None."""
    last = schedule.total_steps - 1
    if step >= last or not schedule.decay_param or schedule.name == "plateau":
        return None
    n = schedule.decay_count(step)
    if schedule.decay_count(last) <= n:
        return None
    lo, hi = step, last  # decay_count(lo) == n < decay_count(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if schedule.decay_count(mid) > n:
            hi = mid
        else:
            lo = mid
    return hi


def consequence(schedule: Schedule, step: int, verb: str) -> str:
    """What ``verb``, just applied at ``step``, means for the rest of the run ('' for
    verbs that do not touch the LR schedule)."""
    if verb not in SCHEDULE_VERBS:
        return ""
    last = schedule.total_steps - 1
    if step > last:
        return f"after the run's last step ({last}): changes nothing"
    held = schedule.held(step)
    if held is not None:
        if verb == "set_lr_decay":
            return f"LR stays held at {fmt(held[1])} (since step {held[0]}); the factor acts once the hold is released"
        return (f"LR held at {fmt(held[1])} from step {step} to the end (step {last}); "
                "a set_lr/scale_lr without --hold gives the schedule back")
    now = schedule.lr_at(step)
    if _is_plateau(schedule):
        return _plateau_words(schedule, step, now)
    steps = _steps(schedule, step, last)
    lrs = [schedule.lr_at(k) for k in steps]
    final = lrs[-1]
    i_peak = max(range(len(lrs)), key=lambda i: (lrs[i], -i))
    peak, peak_step = lrs[i_peak], steps[i_peak]
    parts = []
    w = warmup_end(schedule, step)
    if verb == "set_lr_decay":
        k = next_decay(schedule, step)
        if k is not None:
            parts.append(f"next decay at step {k}: {fmt(schedule.lr_at(k - 1))} -> {fmt(schedule.lr_at(k))}")
    if w is not None:
        lead = "warmup continues"
        if peak > now:
            parts.insert(0, f"peak {fmt(peak)} at step {peak_step}")
    else:
        lead = f"{schedule.name} continues from {fmt(now)}"
        if peak > now * (1 + 1e-9):
            parts.insert(0, f"rises to {fmt(peak)} at step {peak_step}")
    parts.append(f"final {fmt(final)} at step {last}")
    return f"{lead}: " + ", ".join(parts)


def _is_plateau(schedule: Schedule) -> bool:
    inner = getattr(schedule, "after", None)
    return schedule.name == "plateau" or (inner is not None and inner.name == "plateau")


def _plateau_words(schedule: Schedule, step: int, now: float) -> str:
    s = schedule if schedule.name == "plateau" else schedule.after
    p = s.params
    return (f"plateau continues from {fmt(now)}: x{s.decay:g} after {p.patience + 1} epoch(s) without "
            f"improvement in {p.monitor} (floor {fmt(p.min_lr * schedule._num / schedule._den)})")
