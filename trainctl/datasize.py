"""How many samples and optimizer steps a spec's data gives, without loading it.

Torch-free and data-free: the server (dry runs, set_lr_decay checks) and `schedule
preview` need the steps per epoch and must not import torch or read a dataset to get
them. Where the count depends on files only a worker sees (imagefolder) the answer is
None; callers then use what the run reported. `tests/test_datasize.py` checks every
count against the real loaders.
"""
from __future__ import annotations

import math
from typing import List, Optional

# sklearn's bundled handwritten digits: samples per class 0..9 (1797 in all).
DIGITS_CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
SYNTHETIC_CLASSES = 10
SYNTHETIC_SAMPLES = 2048


def long_tail_counts(n_max: int, num_classes: int, ratio: float) -> List[int]:
    """n_i = n_max * (1/ratio)^(i/(C-1)), floored, at least 1 (Cao et al. 2019's recipe)."""
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * (1.0 / ratio) ** (i / (num_classes - 1))))
            for i in range(num_classes)]


def _stratified_train_counts(counts: tuple[int, ...], n_train: int) -> Optional[list[tuple[int, int]]]:
    """Per-class train counts of sklearn's stratified split as (low, high): sklearn's
    `_approximate_mode` floors each class's share and hands the remainder out by largest
    fraction, breaking ties at random; classes in a tie that straddles the cut get
    (floor, floor + 1)."""
    total = sum(counts)
    cont = [c / total * n_train for c in counts]  # the same float ops as numpy's
    floored = [math.floor(x) for x in cont]
    need = n_train - sum(floored)
    out = [(f, f) for f in floored]
    rem = [x - f for x, f in zip(cont, floored)]
    for value in sorted(set(rem), reverse=True):
        if need <= 0:
            break
        inds = [i for i, r in enumerate(rem) if r == value]
        if len(inds) <= need:
            for i in inds:
                out[i] = (floored[i] + 1, floored[i] + 1)
        else:
            for i in inds:
                out[i] = (floored[i], floored[i] + 1)
        need -= min(len(inds), need)
    return out


def train_samples(data) -> Optional[int]:
    """Training samples of one epoch over all ranks for a `DataParams`, or None when only
    the worker can count them (imagefolder, or a tie sklearn breaks at random)."""
    n_all = sum(DIGITS_CLASS_COUNTS)
    if data.dataset == "digits":
        return n_all - math.ceil(data.val_fraction * n_all)  # sklearn: n_test = ceil(f * n)
    if data.dataset == "digits_lt":
        n_train = n_all - math.ceil(data.val_fraction * n_all)
        per_class = _stratified_train_counts(DIGITS_CLASS_COUNTS, n_train)
        lows, highs = min(lo for lo, _ in per_class), min(hi for _, hi in per_class)
        if lows != highs:
            return None
        return sum(long_tail_counts(lows, len(DIGITS_CLASS_COUNTS), data.imbalance_ratio))
    if data.dataset == "synthetic":
        n = data.num_samples or SYNTHETIC_SAMPLES
        return n - max(1, int(round(n * data.val_fraction)))
    return None


def loader_batches(samples: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per epoch of one rank's train loader (see data.build_data: the shard is
    padded to ceil(n / world_size); the ragged last batch is dropped when a full one fits)."""
    shard = math.ceil(samples / world_size)
    if shard >= batch_size:
        return shard // batch_size
    return 1 if shard else 0


def steps_per_epoch(spec) -> Optional[int]:
    """Optimizer steps per epoch of a validated `Spec`, as the worker will count them, or
    None when the data must be seen to know (see `train_samples`). Raises ValueError when
    no full optimizer step fits (the worker's own error)."""
    n = train_samples(spec.data)
    if n is None:
        return None
    world = spec.resources.nproc * spec.resources.nnodes
    return spec.train.steps_per_epoch(loader_batches(n, spec.data.batch_size, world), spec.data.batch_size)
