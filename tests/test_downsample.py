import math
import random
import time

import pytest

from trainctl.server.downsample import downsample_minmax


def test_short_series_and_no_limit_unchanged():
    steps, values = [1, 2, 3], [3.0, 1.0, 2.0]
    assert downsample_minmax(steps, values, 10) == (steps, values)
    assert downsample_minmax(steps, values, 3) == (steps, values)
    assert downsample_minmax(steps, values, 0) == (steps, values)
    assert downsample_minmax([], [], 5) == ([], [])


def test_tiny_limits():
    steps, values = list(range(10)), [float(v) for v in range(10)]
    assert downsample_minmax(steps, values, 1) == ([0], [0.0])
    assert downsample_minmax(steps, values, 2) == ([0, 9], [0.0, 9.0])
    assert downsample_minmax(steps, values, 3) == ([0, 9], [0.0, 9.0])


def test_keeps_first_last_and_every_spike():
    n = 10_000
    steps = list(range(0, 2 * n, 2))
    values = [1.0] * n
    values[1234] = 50.0  # a loss spike
    values[7777] = -3.0  # a dip
    s, v = downsample_minmax(steps, values, 100)
    assert len(s) <= 100
    assert s[0] == 0 and s[-1] == steps[-1]
    assert (steps[1234], 50.0) in zip(s, v)
    assert (steps[7777], -3.0) in zip(s, v)
    assert s == sorted(set(s))  # still in step order, no duplicates


def test_bucket_extremes_in_step_order():
    # interior [9, 1, 8, 2] in 1 bucket: the max (step 1) comes before the min (step 2).
    s, v = downsample_minmax([0, 1, 2, 3, 4, 5], [5.0, 9.0, 1.0, 8.0, 2.0, 5.0], 4)
    assert (s, v) == ([0, 1, 2, 5], [5.0, 9.0, 1.0, 5.0])


def test_matches_envelope_of_random_series():
    rng = random.Random(0)
    values = [rng.gauss(0, 1) for _ in range(5_000)]
    s, v = downsample_minmax(list(range(5_000)), values, 500)
    assert max(v) == max(values) and min(v) == min(values)
    assert len(s) <= 500


def test_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        downsample_minmax([1, 2], [1.0], 1)


def test_one_million_points_is_fast():
    n = 1_000_000
    steps = list(range(n))
    values = [math.sin(i / 1000.0) for i in range(n)]
    t0 = time.perf_counter()
    s, v = downsample_minmax(steps, values, 2_000)
    elapsed = time.perf_counter() - t0
    assert len(s) <= 2_000 and s[-1] == n - 1
    assert elapsed < 0.5, f"{elapsed:.3f} s for 1M points"
