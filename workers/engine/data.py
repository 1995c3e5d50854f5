"""Datasets and loaders: spec section `data:` -> DataBundle.

Randomness is a pure function of seeds, never of global RNG state or worker count:
  * params.seed fixes what the data is (train/val split, long-tail subsample, the
    synthetic draw), so runs that differ only in train seed share a validation set;
  * the `seed` argument (the run's train seed) fixes the shuffle order and the
    augmentation of each epoch, re-derived from (seed, epoch) by `set_epoch`, so a run
    resumed from a checkpoint at epoch k sees the same batches as one that never stopped.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from trainctl.datasize import SYNTHETIC_CLASSES, SYNTHETIC_SAMPLES, long_tail_counts  # noqa: F401 (re-exported)
from trainctl.params.model_data import DataParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Synthetic images share a pool of noise tensors at most this big, so a benchmark at
# 224 px with a million samples does not need terabytes of RAM.
_SYNTHETIC_POOL_BYTES = 256 << 20


class DataError(ValueError):
    """A data spec that cannot be honoured on this worker (missing folder, bad split)."""


def mix_seed(*parts: int) -> int:
    """Independent 32-bit seed from several ints (seed, epoch, index...).

    SeedSequence hashes its entropy, so (seed, epoch) and (seed + 1, epoch - 1) do not
    collide the way seed + epoch would."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
               .generate_state(1)[0])


@dataclass
class DataBundle:
    train: DataLoader
    val: DataLoader
    num_classes: int
    in_chans: int
    class_counts: List[int]  # training samples per class (this rank's view: the full train set)
    class_names: List[str]
    img_size: int
    epoch: int = field(default=0)

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch (0-based), before iterating `train`."""
        self.epoch = epoch
        for obj in (self.train.sampler, self.train.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)


class EpochSampler(Sampler[int]):
    """Shuffled (or sequential) indices, reseeded from (seed, epoch), sharded by rank.

    Like DistributedSampler it pads by wrapping around so every rank gets the same number
    of samples (and so the same number of steps: control commands apply at one step on
    all ranks)."""

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0x5EED))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        total = len(self) * self.world_size
        if total > self.n:
            order = torch.cat([order, order[: total - self.n]])
        return iter(order[self.rank::self.world_size].tolist())


class TensorImages(Dataset):
    """In-memory images [N, C, H, W] with labels [N].

    `__getitems__` lets the DataLoader fetch a whole batch with one index op instead of
    N Python calls plus a stack; pair it with `collate=passthrough`.
    Optional augmentation is a random translation by up to `shift` pixels whose offsets
    are drawn per epoch from (seed, epoch): no flips, they change what a digit means.

    Batches are gathered with numpy, not torch: torch's intra-op thread pool turned a
    256 KB gather into ~15 ms on a busy 2-core host (0.03 ms single-threaded)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, shift: int = 0, seed: int = 0,
                 fill: float = 0.0):
        self.x, self.y = x.contiguous(), y
        self._xn = self.x.numpy()  # shares memory with self.x
        self.shift, self.seed, self.fill = shift, seed, fill
        self.offsets: Optional[np.ndarray] = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if self.shift:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xA06))
            self.offsets = torch.randint(0, 2 * self.shift + 1, (len(self.y), 2),
                                         generator=g).numpy()

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, indices: Sequence[int]):
        idx = np.asarray(indices, dtype=np.int64)
        x = self._xn[idx]
        if self.shift:
            x = _translate(x, self.offsets[idx], self.shift, self.fill)
        return torch.from_numpy(x), self.y[torch.from_numpy(idx)]

    def __getitem__(self, i: int):
        x, y = self.__getitems__([i])
        return x[0], y[0]


def _translate(x: np.ndarray, offsets: np.ndarray, pad: int, fill: float) -> np.ndarray:
    """Shift each image by offsets - pad pixels (a padded random crop), vectorised."""
    b, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    rows = offsets[:, 0:1] + np.arange(h)  # [B, H]
    cols = offsets[:, 1:2] + np.arange(w)  # [B, W]
    out = padded[np.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # advanced indexing put C last


class SyntheticImages(Dataset):
    """x_i = prototype[y_i] + noise[i mod P]: class-dependent means, so a model can learn
    it and accuracy rises, while memory stays bounded by the noise pool."""

    def __init__(self, prototypes: torch.Tensor, y: torch.Tensor, noise: torch.Tensor):
        self.prototypes, self.y, self.noise = prototypes, y, noise
        # numpy gathers, for the same reason as TensorImages
        self._pn, self._yn, self._nn = prototypes.numpy(), y.numpy(), noise.numpy()

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, indices: Sequence[int]):
        idx = np.asarray(indices, dtype=np.int64)
        y = self._yn[idx]
        x = self._pn[y] + self._nn[idx % len(self._nn)]
        return torch.from_numpy(x), torch.from_numpy(y)

    def __getitem__(self, i: int):
        x, y = self.__getitems__([i])
        return x[0], y[0]


class SeededImages(Dataset):
    """Wraps a transform-applying dataset (ImageFolder) so its augmentation RNG is
    f(seed, epoch, index): independent of worker count and of the global torch RNG the
    training loop uses. A wrapper, not a subclass, so it pickles for worker processes."""

    def __init__(self, base, *, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0
        self.targets, self.classes = base.targets, base.classes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, i))
            return self.base[i]


def _ops(params: DataParams) -> set:
    """The augmentations a validated DataParams asks for (its `augment` list, or none)."""
    a = params.augment
    if a is True:  # a DataParams built with model_construct skips the validator
        from trainctl.params.model_data import DEFAULT_AUGMENT

        return set(DEFAULT_AUGMENT.get(params.dataset, ()))
    return set(a) if a else set()


def passthrough(batch):
    """collate_fn for datasets whose __getitems__ already returns a stacked batch."""
    return batch


# ---------------------------------------------------------------- builders


def build_data(params: DataParams, *, seed: int, rank: int = 0,
               world_size: int = 1) -> DataBundle:
    """seed: the run's train seed (shuffle/augment order). rank/world_size: DDP sharding
    of the train loader; every rank evaluates the whole validation set."""
    if params.dataset in ("digits", "digits_lt"):
        train_ds, val_ds, names, in_chans = _digits(params, seed)
    elif params.dataset == "synthetic":
        train_ds, val_ds, names, in_chans = _synthetic(params)
    elif params.dataset == "imagefolder":
        train_ds, val_ds, names, in_chans = _imagefolder(params, seed)
    else:  # DataParams's Literal makes this unreachable; kept for model_construct users
        raise DataError(f"data.dataset: unknown dataset {params.dataset!r}")
    if isinstance(train_ds, (TensorImages, SyntheticImages)):
        targets = train_ds.y.tolist()
        collate = passthrough
    else:
        targets = list(train_ds.targets)
        collate = None
    num_classes = len(names)
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).tolist()

    sampler = EpochSampler(len(train_ds), seed=seed, shuffle=True, rank=rank,
                           world_size=world_size)
    shard = len(sampler)
    # Drop the ragged last batch when there is at least one full one: a batch of 1 breaks
    # BatchNorm, and equal batches keep per-step metrics comparable. Shuffling means a
    # different remainder is skipped each epoch.
    train = DataLoader(train_ds, batch_size=params.batch_size, sampler=sampler,
                       drop_last=shard >= params.batch_size, num_workers=params.num_workers,
                       collate_fn=collate)
    val_sampler = EpochSampler(len(val_ds), seed=seed, shuffle=False)
    val = DataLoader(val_ds, batch_size=params.batch_size, sampler=val_sampler,
                     num_workers=params.num_workers, collate_fn=collate)
    return DataBundle(train=train, val=val, num_classes=num_classes, in_chans=in_chans,
                      class_counts=counts, class_names=names, img_size=params.img_size)


@functools.lru_cache(maxsize=1)
def _load_digits():
    from sklearn.datasets import load_digits  # bundled with sklearn, nothing downloaded

    d = load_digits()  # parses a csv.gz each call (~0.1 s): once per process is enough
    images = d.images.astype(np.float32) / 16.0  # 0..16 ink levels -> [0, 1]
    images.flags.writeable = False  # shared by every build_data call
    labels = d.target.astype(np.int64)
    labels.flags.writeable = False
    return images, labels


def _digits(params: DataParams, seed: int):
    from sklearn.model_selection import train_test_split

    images, labels = _load_digits()
    num_classes = int(labels.max()) + 1
    try:
        tr, va = train_test_split(np.arange(len(labels)), test_size=params.val_fraction,
                                  stratify=labels, random_state=params.seed)
    except ValueError as e:
        raise DataError(f"data.val_fraction: cannot split digits with "
                        f"{params.val_fraction}: {e}") from None
    if params.dataset == "digits_lt":
        rng = np.random.default_rng(params.seed)
        # n_max is the smallest class's train count so every class can fill its quota.
        n_max = int(np.bincount(labels[tr]).min())
        quota = long_tail_counts(n_max, num_classes, params.imbalance_ratio)
        tr = np.concatenate([rng.choice(tr[labels[tr] == c], quota[c], replace=False)
                             for c in range(num_classes)])
        # Balanced validation, as the paper's test sets: overall accuracy then equals
        # mean per-class accuracy, which is what long-tail methods are judged on.
        n_val = int(np.bincount(labels[va]).min())
        va = np.concatenate([rng.choice(va[labels[va] == c], n_val, replace=False)
                             for c in range(num_classes)])
        tr.sort(), va.sort()

    x = torch.from_numpy(images.copy()).unsqueeze(1)
    if params.img_size != x.shape[-1]:
        # Once, up front: per-batch resizing would cost more than the tiny models train.
        x = F.interpolate(x, size=(params.img_size, params.img_size), mode="bilinear",
                          align_corners=False)
    x_tr, x_va = x[torch.from_numpy(tr)], x[torch.from_numpy(va)]
    mean, std = x_tr.mean(), x_tr.std()  # train statistics only: val must not leak in
    x_tr = ((x_tr - mean) / std).contiguous()
    x_va = ((x_va - mean) / std).contiguous()
    y = torch.from_numpy(labels.copy())
    shift = max(1, params.img_size // 8) if "random_crop" in _ops(params) else 0
    fill = float(-mean / std)  # blank paper, not a grey border
    train = TensorImages(x_tr, y[torch.from_numpy(tr)], shift=shift, seed=seed, fill=fill)
    val = TensorImages(x_va, y[torch.from_numpy(va)])
    return train, val, [str(i) for i in range(num_classes)], 1


def _synthetic(params: DataParams):
    c = params.num_classes or SYNTHETIC_CLASSES
    n = params.num_samples or SYNTHETIC_SAMPLES
    s, chans = params.img_size, 3
    g = torch.Generator().manual_seed(mix_seed(params.seed, 0x5717))
    # Smooth 4x4 patterns upsampled: survive resizing, unlike per-pixel noise.
    protos = F.interpolate(torch.randn(c, chans, 4, 4, generator=g), size=(s, s),
                           mode="bilinear", align_corners=False)
    n_val = max(1, int(round(n * params.val_fraction)))
    n_train = n - n_val
    if n_train < 1:
        raise DataError(f"data.num_samples: {n} leaves no training samples")
    labels = torch.arange(n) % c  # equal classes, in random order
    labels = labels[torch.randperm(n, generator=g)]
    pool = max(1, min(n, _SYNTHETIC_POOL_BYTES // (chans * s * s * 4)))
    noise = torch.randn(pool, chans, s, s, generator=g)
    # Val indexes the pool from the other end so it does not reuse train's first draws.
    val_noise = torch.flip(noise, dims=[0])
    train = SyntheticImages(protos, labels[:n_train], noise)
    val = SyntheticImages(protos, labels[n_train:], val_noise)
    return train, val, [f"class_{i}" for i in range(c)], chans


def _imagefolder(params: DataParams, seed: int):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    root = params.path
    for p in (root, os.path.join(root, "train"), os.path.join(root, "val")):
        if not os.path.isdir(p):
            raise DataError(f"data.path: {p} does not exist")
    s = params.img_size
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    # Resize the shorter side then centre-crop: square output without distorting aspect.
    plain = v2.Compose([v2.ToImage(), v2.Resize(s), v2.CenterCrop(s), *tail])
    ops = _ops(params)
    if "random_crop" in ops and params.resize_range:
        lo, hi = params.resize_range
        crop = [v2.RandomResize(lo, hi + 1), v2.RandomCrop(s)]
    elif "random_crop" in ops:
        crop = [v2.RandomResizedCrop(s)]
    else:
        crop = [v2.Resize(s), v2.CenterCrop(s)]
    flip = [v2.RandomHorizontalFlip()] if "hflip" in ops else []
    train_tf = v2.Compose([v2.ToImage(), *crop, *flip, *tail]) if ops else plain

    try:
        train = SeededImages(ImageFolder(os.path.join(root, "train"), transform=train_tf),
                             seed=seed)
        val = ImageFolder(os.path.join(root, "val"), transform=plain)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"data.path: {e}") from None
    if val.classes != train.classes:
        raise DataError(f"data.path: {root}/val classes {val.classes} differ from "
                        f"train classes {train.classes}")
    return train, val, list(train.classes), 3
