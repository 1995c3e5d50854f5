"""Shrinking a metric series for display without hiding its spikes.

GetMetrics with `max_points` answers a plot, and a plot of a loss curve must still
show the one step where the loss blew up. Averaging or taking every k-th point would
drop it; keeping each bucket's minimum and maximum keeps the envelope of the curve.

Pure Python (the server image has no numpy): the heavy lifting is `min`, `max` and
`list.index` over list slices, which run in C, so a million points take a few tens of
milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence


def downsample_minmax(
    steps: Sequence[int], values: Sequence[float], max_points: int
) -> tuple[list[int], list[float]]:
    """At most `max_points` points of the series, keeping its extremes.

    The first and last points are always kept. The points between are split into
    (max_points - 2) // 2 buckets of consecutive points; each bucket contributes its
    minimum and its maximum (one point when they coincide), in step order, so the
    result is still sorted by step. A series that already fits, or `max_points <= 0`
    (no downsampling), comes back unchanged. `values` must not contain NaN (the store
    never holds any: absent values are not stored).
    """
    n = len(steps)
    if len(values) != n:
        raise ValueError(f"steps and values differ in length: {n} != {len(values)}")
    if max_points <= 0 or n <= max_points:
        return list(steps), list(values)
    if max_points == 1:
        return [steps[0]], [values[0]]

    values = values if isinstance(values, list) else list(values)
    n_buckets = (max_points - 2) // 2
    interior = n - 2  # the points strictly between first and last
    keep = [0]
    for b in range(n_buckets):
        lo = 1 + b * interior // n_buckets
        hi = 1 + (b + 1) * interior // n_buckets
        chunk = values[lo:hi]
        i_min = lo + chunk.index(min(chunk))
        i_max = lo + chunk.index(max(chunk))
        if i_min < i_max:
            keep += (i_min, i_max)
        elif i_max < i_min:
            keep += (i_max, i_min)
        else:
            keep.append(i_min)
    keep.append(n - 1)
    return [steps[i] for i in keep], [values[i] for i in keep]
