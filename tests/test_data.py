"""Datasets: shapes, splits, determinism, long-tail counts, ImageFolder on disk."""
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from trainctl.workers.engine.data import (DataError, _translate, build_data,
                                          long_tail_counts)
from trainctl.params.model_data import DataParams


@pytest.fixture(scope="module")
def digits():
    return build_data(DataParams(dataset="digits"), seed=1)


def first_batch(bundle, epoch=0):
    bundle.set_epoch(epoch)
    return next(iter(bundle.train))


def test_digits_shapes_and_split(digits):
    assert (digits.num_classes, digits.in_chans, digits.img_size) == (10, 1, 32)
    n_train, n_val = len(digits.train.dataset), len(digits.val.dataset)
    assert n_train + n_val == 1797 and n_val == 360  # sklearn rounds the test share up
    assert sum(digits.class_counts) == n_train and min(digits.class_counts) > 130
    x, y = first_batch(digits)
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(digits.train) == n_train // 64  # ragged last batch dropped
    xs = torch.cat([x for x, _ in digits.val])
    assert xs.shape == (n_val, 1, 32, 32) and len(digits.val.dataset) == n_val
    assert abs(float(digits.train.dataset.x.mean())) < 1e-3  # normalised on train stats


def test_digits_deterministic(digits):
    again = build_data(DataParams(dataset="digits"), seed=1)
    x1, y1 = first_batch(digits, 0)
    x2, y2 = first_batch(again, 0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    _, y_e1 = first_batch(digits, 1)
    assert not torch.equal(y1, y_e1)  # a new order each epoch...
    _, y_e1b = first_batch(again, 1)
    assert torch.equal(y_e1, y_e1b)  # ...that a resumed run reproduces


def test_train_seed_changes_order_not_validation(digits):
    other = build_data(DataParams(dataset="digits"), seed=2)
    assert not torch.equal(first_batch(digits)[1], first_batch(other)[1])
    assert torch.equal(digits.val.dataset.x, other.val.dataset.x)
    moved = build_data(DataParams(dataset="digits", seed=5), seed=1)
    assert not torch.equal(digits.val.dataset.y, moved.val.dataset.y)


def test_digits_lt_counts_decay_and_val_balanced():
    ratio = 10.0
    b = build_data(DataParams(dataset="digits_lt", imbalance_ratio=ratio), seed=0)
    c = b.class_counts
    assert c == long_tail_counts(c[0], 10, ratio)
    assert c == sorted(c, reverse=True) and c[-1] == int(c[0] / ratio)
    val = torch.bincount(b.val.dataset.y, minlength=10)
    assert val.min() == val.max() > 30


def test_long_tail_counts_formula():
    assert long_tail_counts(100, 3, 100.0) == [100, 10, 1]
    assert long_tail_counts(100, 3, 1.0) == [100, 100, 100]


def test_ddp_shards_equal_and_cover():
    p = DataParams(dataset="digits", batch_size=50)
    shards = [build_data(p, seed=0, rank=r, world_size=2) for r in (0, 1)]
    for s in shards:
        s.set_epoch(0)
    idx = [list(iter(s.train.sampler)) for s in shards]
    assert len(idx[0]) == len(idx[1]) == 719
    assert set(idx[0]) | set(idx[1]) == set(range(1437))


def test_digits_augment_translation():
    b = build_data(DataParams(dataset="digits", augment=True, img_size=16), seed=0)
    x, _ = first_batch(b)
    assert x.shape == (64, 1, 16, 16)
    img = np.arange(16.0, dtype=np.float32).reshape(1, 1, 4, 4)
    same = _translate(img, np.array([[1, 1]]), 1, 0.0)
    assert np.array_equal(same, img)  # offset == pad is the identity
    down = _translate(img, np.array([[0, 1]]), 1, -1.0)
    assert np.array_equal(down[0, 0, 0], np.full(4, -1.0))  # shifted down, filled
    assert np.array_equal(down[0, 0, 1:], img[0, 0, :3])


def test_synthetic_is_learnable():
    b = build_data(DataParams(dataset="synthetic", num_classes=4, num_samples=400,
                              img_size=16), seed=0)
    assert (b.num_classes, b.in_chans) == (4, 3)
    tr, va = b.train.dataset, b.val.dataset
    xt, yt = tr.__getitems__(range(len(tr)))
    xv, yv = va.__getitems__(range(len(va)))
    means = torch.stack([xt[yt == c].mean(0) for c in range(4)]).flatten(1)
    pred = torch.cdist(xv.flatten(1), means).argmin(1)
    assert (pred == yv).float().mean() > 0.9  # nearest class mean already separates them


def _write_tree(root, classes=("cat", "dog"), per=(3, 2)):
    from PIL import Image
    for split, n in zip(("train", "val"), per):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB" if i % 2 else "L", (20 + i, 24),
                          color=(40 * k + i, 10, 200) if i % 2 else 90).save(d / f"{i}.png")


def test_imagefolder_tiny_tree(tmp_path):
    _write_tree(tmp_path)
    p = DataParams(dataset="imagefolder", path=str(tmp_path), img_size=16, batch_size=4)
    b = build_data(p, seed=0)
    assert b.class_names == ["cat", "dog"] and b.class_counts == [3, 3]
    assert (b.num_classes, b.in_chans) == (2, 3)
    x, y = first_batch(b)
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    xv, yv = next(iter(b.val))
    assert xv.shape == (4, 3, 16, 16) and yv.tolist() == [0, 0, 1, 1]


def test_imagefolder_augment_deterministic(tmp_path):
    _write_tree(tmp_path)
    p = DataParams(dataset="imagefolder", path=str(tmp_path), img_size=16, batch_size=6,
                   augment=True, resize_range=(16, 24))
    a, b = build_data(p, seed=3), build_data(p, seed=3)
    torch.manual_seed(0)
    xa, _ = first_batch(a, 2)
    torch.manual_seed(1)  # global RNG must not matter
    xb, _ = first_batch(b, 2)
    assert torch.equal(xa, xb)


def test_imagefolder_missing_path(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=f"data.path: {tmp_path}/train does not exist"):
        build_data(DataParams(dataset="imagefolder", path=str(tmp_path)), seed=0)


def test_data_params_validation():
    with pytest.raises(ValidationError, match="data.path: required"):
        DataParams(dataset="imagefolder")
    with pytest.raises(ValidationError, match="data.path: only used by dataset imagefolder"):
        DataParams(dataset="digits", path="/x")
    with pytest.raises(ValidationError, match="data.imbalance_ratio: only used"):
        DataParams(dataset="digits", imbalance_ratio=5)
    with pytest.raises(ValidationError) as e:
        DataParams(dataset="digits", batch_size=0, bogus=1)
    assert {err["loc"] for err in e.value.errors()} == {("batch_size",), ("bogus",)}
    with pytest.raises(ValidationError, match="data.resize_range"):
        DataParams(dataset="imagefolder", path="/x", img_size=32, augment=True,
                   resize_range=(16, 40))


@pytest.mark.parametrize("fields, message", [
    ({"dataset": "imagefolder", "path": "/x", "val_fraction": 0.1}, "data.val_fraction: only"),
    ({"dataset": "synthetic", "augment": True}, "data.augment: only"),
    ({"dataset": "digits_lt", "num_samples": 10}, "data.num_samples: only"),
])
def test_fields_for_other_datasets_rejected(fields, message):
    with pytest.raises(ValidationError, match=message):
        DataParams(**fields)


@pytest.mark.parametrize("fields", [
    {"dataset": "digits"},
    {"dataset": "digits_lt", "imbalance_ratio": 50},
    {"dataset": "imagefolder", "path": "/x", "augment": True, "resize_range": (32, 48)},
    {"dataset": "synthetic", "num_classes": 3, "num_samples": 99},
])
def test_stored_spec_with_defaults_written_out_revalidates(fields):
    p = DataParams(**fields)
    assert DataParams.model_validate(p.model_dump(mode="json")) == p


# ---------------------------------------------------------------- issue 11 item 16


def _train_transforms(bundle):
    return [type(t).__name__ for t in bundle.train.dataset.base.transform.transforms]


def test_augment_is_explicit_and_hflip_is_opt_in(tmp_path):
    _write_tree(tmp_path)
    # `true` is the dataset's default, written out in the validated (stored) spec
    assert DataParams(dataset="digits", augment=True).augment == ["random_crop"]
    assert DataParams(dataset="imagefolder", path="/x", augment=True).augment == ["random_crop", "hflip"]
    assert DataParams(dataset="digits", augment=[]).augment is False
    with pytest.raises(ValidationError, match="data.augment: hflip is offered for imagefolder only"):
        DataParams(dataset="digits", augment=["random_crop", "hflip"])
    with pytest.raises(ValidationError, match="augment"):
        DataParams(dataset="imagefolder", path="/x", augment=["rotate"])
    base = dict(dataset="imagefolder", path=str(tmp_path), img_size=16, batch_size=4)
    crop_only = build_data(DataParams(**base, augment=["random_crop"]), seed=0)
    both = build_data(DataParams(**base, augment=["random_crop", "hflip"]), seed=0)
    flip_only = build_data(DataParams(**base, augment=["hflip"]), seed=0)
    assert "RandomHorizontalFlip" not in _train_transforms(crop_only)
    assert "RandomResizedCrop" in _train_transforms(crop_only)
    assert {"RandomResizedCrop", "RandomHorizontalFlip"} <= set(_train_transforms(both))
    assert "RandomHorizontalFlip" in _train_transforms(flip_only)
    assert "RandomResizedCrop" not in _train_transforms(flip_only)
    # digits: [random_crop] is what `true` always did (a translation), nothing else
    a = build_data(DataParams(dataset="digits", augment=True, img_size=16), seed=0)
    b = build_data(DataParams(dataset="digits", augment=["random_crop"], img_size=16), seed=0)
    assert torch.equal(first_batch(a)[0], first_batch(b)[0])
    p = DataParams(**base, augment=["hflip", "random_crop"])
    assert DataParams.model_validate(p.model_dump(mode="json")) == p


def test_per_class_metrics_are_named_by_class_folder(tmp_path):
    """A tiny imagefolder of PNGs through the real Trainer: val_acc/<folder> per class."""
    from trainctl.spec import parse_spec
    from trainctl.workers.engine.context import EPOCH, ListSink, TrainingContext
    from trainctl.workers.engine.loop import Trainer

    _write_tree(tmp_path, classes=("one", "three", "seven"), per=(4, 2))
    spec = parse_spec({"name": "folder", "model": {"name": "resnet10t"},
                       "data": {"dataset": "imagefolder", "path": str(tmp_path), "img_size": 16, "batch_size": 4,
                                "augment": ["random_crop"]},
                       "train": {"epochs": 1, "checkpoint_every": 0}}, check_model=False)
    sink = ListSink()
    Trainer(spec, TrainingContext(sink=sink)).run()
    (row,) = [v for scope, _, _, v in sink.rows if scope == EPOCH]
    assert {"val_acc/one", "val_acc/three", "val_acc/seven"} <= set(row)
    assert not [k for k in row if k.startswith("val_acc_class")]
