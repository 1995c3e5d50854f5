"""The loop's rows as metric batches, column by column (the background side of `run.log`).

The loop hands over (scope, step, epoch, wall, {name: float|int|tensor}) tuples; here
they become MetricBatch messages with as little Python per row as possible, since this
thread competes with the loop for the GIL (issue 12: the SDK within 1 % of a bare loop):

- consecutive rows with the same scope and names (a loop logs the same names every
  step) form one group, cut into columns, one per name;
- a column of tensors is one `torch.stack` and one host copy (on GPU: one sync per column
  per batch, never one per step); a column of Python numbers is one array;
- with numpy, a group's rows are encoded all at once into the MetricRow wire format
  (a structured array whose bytes are the rows) and parsed by protobuf's C code. Its
  varints have a fixed width (non-minimal varints are valid protobuf: every parser
  accepts them), which is what makes every row the same size. Without numpy, or with
  rows out of that layout's range, rows are added one by one.

A value that is not a number (a string, a tensor of several elements) becomes NaN,
which the MetricBatch contract reads as "absent from this row", with one warning per name.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator, Optional

from trainctl.outbox import MAX_ROWS_PER_BATCH
from trainctl.v1 import trainctl_pb2 as pb

log = logging.getLogger("trainctl.attach")

_NAN = math.nan
_warned: set[str] = set()

_UNSET = object()
np = _UNSET  # numpy, imported on first use (not at `import trainctl`); None: not installed


def _numpy():
    global np
    if np is _UNSET:
        try:
            import numpy
            np = numpy
        except ImportError:  # an optional dependency: the slower row-by-row encoding then
            np = None
    return np

# Fixed-width layout of one encoded MetricRow (field 6 of MetricBatch): step as a 5-byte
# varint (< 2**35), epoch as a 3-byte varint (< 2**21), wall_time, packed values.
_STEP_BYTES, _EPOCH_BYTES = 5, 3
_MAX_STEP, _MAX_EPOCH = 1 << (7 * _STEP_BYTES), 1 << (7 * _EPOCH_BYTES)
_MAX_FAST_NAMES = 13  # the row's length then fits in one varint byte (< 128)


def groups(raw: list[tuple]) -> Iterator[tuple[int, tuple, list[tuple]]]:
    """(scope, names, rows): runs of consecutive rows of one scope and one set of names."""
    start, key = 0, None
    for i, r in enumerate(raw):
        k = (r[0], tuple(r[4]))
        if k != key:
            if key is not None:
                yield key[0], key[1], raw[start:i]
            start, key = i, k
    if key is not None:
        yield key[0], key[1], raw[start:]


def column(name: str, values: list) -> list:
    """One name's values as floats (NaN where not a number): tensors in one copy."""
    first = values[0]
    t = type(first)
    if t is float and all(type(v) is float for v in values):
        return values
    if hasattr(first, "detach"):
        if getattr(first, "is_cpu", False):
            try:  # host memory: .item() is several times cheaper than a stack of 0-d tensors
                return [v.item() for v in values]
            except (RuntimeError, ValueError):  # not one element each: value by value below
                pass
        else:  # an accelerator: one stack and one copy (sync) for the whole column
            try:
                import torch
                with torch.no_grad():
                    flat = torch.stack(values).reshape(len(values), -1)
                    if flat.shape[1] == 1:
                        return flat[:, 0].double().tolist()
            except (RuntimeError, TypeError):  # mixed devices/shapes/types: value by value below
                pass
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError, RuntimeError):
            out.append(_NAN)
            if name not in _warned:
                _warned.add(name)
                log.warning("trainctl: run.log(%s=...): %s is not a number (a float or a one-element "
                            "tensor); left out", name, type(v).__name__)
    return out


def columns(names: tuple, rows: list[tuple]) -> list[list]:
    return [column(n, [r[4][n] for r in rows]) for n in names]


def rows_to_plain(raw: list[tuple]) -> list[tuple]:
    """The rows with every value a float, values that are not numbers left out of their
    row (rows left empty are dropped). Used before the run is registered (these rows may
    go to disk as JSON) and by tests."""
    out = []
    for scope, names, rows in groups(raw):
        cols = columns(names, rows)
        for r, vals in zip(rows, zip(*cols)):
            row = {n: v for n, v, orig in zip(names, vals, (r[4][n] for n in names))
                   if v == v or (type(orig) is float)}  # a logged NaN stays; a non-number goes
            if row:
                out.append((scope, r[1], r[2], r[3], row))
    return out


def batches(raw: list[tuple], experiment_id: int, attempt: int) -> Iterator[pb.MetricBatch]:
    """Unsealed MetricBatch messages (no seq yet) of at most MAX_ROWS_PER_BATCH rows."""
    for scope, names, rows in groups(raw):
        cols = columns(names, rows)
        for lo in range(0, len(rows), MAX_ROWS_PER_BATCH):
            hi = lo + MAX_ROWS_PER_BATCH
            part, pcols = rows[lo:hi], [c[lo:hi] for c in cols]
            batch = pb.MetricBatch(experiment_id=experiment_id, attempt=attempt, scope=scope, names=names)
            encoded = _encode(part, pcols)
            if encoded is not None:
                batch.MergeFromString(encoded)
            else:
                add = batch.rows.add
                for r, vals in zip(part, zip(*pcols) if pcols else ((),) * len(part)):
                    add(step=r[1], epoch=r[2], wall_time=r[3], values=vals)
            yield batch


def _encode(rows: list[tuple], cols: list[list]) -> Optional[bytes]:
    """The rows as MetricBatch field-6 bytes, all at once; None when out of the layout."""
    k = len(cols)
    np = _numpy()
    if np is None or not 1 <= k <= _MAX_FAST_NAMES:
        return None
    steps = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
    epochs = np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows))
    if steps.min() < 0 or steps.max() >= _MAX_STEP or epochs.min() < 0 or epochs.max() >= _MAX_EPOCH:
        return None
    dt = np.dtype([("tag", "u1"), ("len", "u1"), ("t_step", "u1"), ("step", "u1", (_STEP_BYTES,)),
                   ("t_epoch", "u1"), ("epoch", "u1", (_EPOCH_BYTES,)), ("t_wall", "u1"), ("wall", "<f8"),
                   ("t_values", "u1"), ("n_values", "u1"), ("values", "<f8", (k,))])
    a = np.empty(len(rows), dt)
    a["tag"] = (6 << 3) | 2                  # MetricBatch.rows, length-delimited
    a["len"] = dt.itemsize - 2
    a["t_step"], a["t_epoch"], a["t_wall"], a["t_values"] = 1 << 3, 2 << 3, (3 << 3) | 1, (4 << 3) | 2
    a["n_values"] = 8 * k
    for field, v, width in (("step", steps, _STEP_BYTES), ("epoch", epochs, _EPOCH_BYTES)):
        out = a[field]
        for i in range(width):  # 7 bits a byte, the high bit set on all but the last
            out[:, i] = ((v >> (7 * i)) & 0x7F) | (0x80 if i < width - 1 else 0)
    a["wall"] = np.fromiter((r[3] for r in rows), dtype=np.float64, count=len(rows))
    a["values"] = np.array(cols, dtype=np.float64).T
    return a.tobytes()
