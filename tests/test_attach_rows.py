"""rows.py: the loop's rows as MetricBatch messages built column by column, with the
fixed-width wire encoding, must parse to exactly what row-by-row building gives (the
contract's MetricBatch), in and out of that encoding's range."""
from __future__ import annotations

import math
import random

import pytest
import torch

from trainctl.attach import rows as R
from trainctl.v1 import trainctl_pb2 as pb


def _reference(raw, xid=7, attempt=2):
    """What the old row-by-row path sent: one batch per run of same scope + names."""
    out = []
    for scope, names, rows in R.groups(raw):
        b = pb.MetricBatch(experiment_id=xid, attempt=attempt, scope=scope, names=names)
        for r in rows:
            vals = []
            for n in names:
                v = r[4][n]
                try:
                    vals.append(float(v))
                except (TypeError, ValueError, RuntimeError):
                    vals.append(math.nan)
            b.rows.add(step=r[1], epoch=r[2], wall_time=r[3], values=vals)
        out.append(b)
    return out


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.experiment_id, g.attempt, g.scope, list(g.names)) == (w.experiment_id, w.attempt, w.scope,
                                                                         list(w.names))
        assert [(r.step, r.epoch, r.wall_time) for r in g.rows] == [(r.step, r.epoch, r.wall_time) for r in w.rows]
        for a, b in zip(g.rows, w.rows):
            assert len(a.values) == len(b.values)
            assert all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a.values, b.values))


@pytest.mark.parametrize("step0,epoch", [(0, 0), (2**34, 5), (2**35, 0), (10, 2**21)])
def test_batches_parse_to_the_row_by_row_encoding(step0, epoch):
    rnd = random.Random(0)
    raw = [(pb.STEP, step0 + i, epoch, 1.7e9 + rnd.random(),
            {"lr": rnd.random(), "loss": torch.tensor(rnd.random()), "tokens": i, "neg": -rnd.random() * 1e300})
           for i in range(300)]
    raw += [(pb.EPOCH, step0 + 300, epoch, 1.7e9, {"val": 0.25})]
    raw += [(pb.STEP, step0 + 301 + i, epoch, 1.7e9, {"lr": 0.1, "name": "text"}) for i in range(3)]  # NaN: absent
    got = list(R.batches(raw, 7, 2))
    _same(got, _reference(raw))
    assert math.isnan(got[-1].rows[0].values[1])
    # and it survives a round trip through the wire, as the server reads it
    again = [pb.MetricBatch.FromString(b.SerializeToString()) for b in got]
    _same(again, _reference(raw))


def test_many_names_and_big_batches_fall_back_or_split():
    raw = [(pb.STEP, i, 0, 0.5, {f"m{k:02d}": float(k * i) for k in range(20)}) for i in range(4500)]
    got = list(R.batches(raw, 1, 1))
    assert [len(b.rows) for b in got] == [2000, 2000, 500]
    assert got[2].rows[499].values[19] == 19.0 * 4499


def test_without_numpy_the_same_batches(monkeypatch):
    raw = [(pb.STEP, i, 1, 2.0, {"a": float(i), "b": i}) for i in range(50)]
    fast = list(R.batches(raw, 1, 1))
    monkeypatch.setattr(R, "np", None)
    _same(list(R.batches(raw, 1, 1)), fast)
