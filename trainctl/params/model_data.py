"""Spec sections `model:` and `data:` as pydantic models.

Torch-free on purpose: the control server validates specs at Submit and has no torch.
Error messages name the spec field (`data.path: ...`) because pydantic reports
model-level validator errors at the section, not at the field they are about.
"""
from __future__ import annotations

from typing import Any, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

# create_model() arguments that trainctl sets itself; letting kwargs override them would
# bypass the checks below (pretrained_cfg* can point timm at a download URL).
RESERVED_MODEL_KWARGS = frozenset({
    "model_name", "pretrained", "num_classes", "in_chans", "drop_rate",
    "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
})


class ModelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    # None: taken from the dataset (the usual case; a mismatch is an error at build time).
    num_classes: Optional[int] = Field(default=None, ge=1)
    pretrained: bool = False
    weights: Optional[str] = Field(default=None, min_length=1)  # a local state_dict file
    drop_rate: float = Field(default=0.0, ge=0.0, lt=1.0)
    in_chans: Optional[int] = Field(default=None, ge=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "ModelParams":
        if ":" in self.name or "/" in self.name or "\\" in self.name:
            raise ValueError(
                f"model.name: {self.name!r} is a hub id or a path; trainctl takes timm "
                "registry names only (it never downloads) and loads local files through "
                "model.weights")
        if self.pretrained and not self.weights:
            raise ValueError(
                "model.pretrained: true needs model.weights (a local file); trainctl never "
                "downloads weights")
        clash = sorted(RESERVED_MODEL_KWARGS.intersection(self.kwargs))
        if clash:
            raise ValueError(
                f"model.kwargs: {', '.join(clash)} cannot be set through kwargs; use the "
                "model fields (num_classes, in_chans, drop_rate, pretrained, weights)")
        return self


DatasetName = Literal["digits", "digits_lt", "imagefolder", "synthetic"]

# Augmentations by name. random_crop: digits, a random translation of up to img_size/8
# pixels (a padded crop); imagefolder, RandomResizedCrop (or, with resize_range, a
# random shorter side then a random crop). hflip: a horizontal mirror, imagefolder only:
# it turns a 2, 3 or 7 (or any text) into something that is not one.
AugmentName = Literal["random_crop", "hflip"]
# What `augment: true` means per dataset (stored specs spell it out as the list).
DEFAULT_AUGMENT = {"digits": ["random_crop"], "digits_lt": ["random_crop"],
                   "imagefolder": ["random_crop", "hflip"]}

# Fields that only mean something for some datasets; setting them elsewhere is a spec
# mistake we would rather report than silently ignore.
_USED_BY = {
    "path": ("imagefolder",),
    "imbalance_ratio": ("digits_lt",),
    "num_classes": ("synthetic",),
    "num_samples": ("synthetic",),
    "val_fraction": ("digits", "digits_lt", "synthetic"),  # imagefolder has val/
    "augment": ("digits", "digits_lt", "imagefolder"),  # synthetic is for benchmarks
}


class DataParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName
    batch_size: int = Field(default=64, ge=1, le=65536)  # per process (per rank)
    img_size: int = Field(default=32, ge=8, le=1024)
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    path: Optional[str] = Field(default=None, min_length=1)
    imbalance_ratio: float = Field(default=10.0, ge=1.0)
    num_classes: Optional[int] = Field(default=None, ge=2, le=100000)
    num_samples: Optional[int] = Field(default=None, ge=2, le=10_000_000)
    num_workers: int = Field(default=0, ge=0, le=64)
    # Fixes what the data *is* (split, long-tail subsample, synthetic draw), so runs
    # with different train seeds are compared on the same validation set.
    seed: int = Field(default=0, ge=0)
    # false, or the augmentations to apply (see AugmentName); true = the dataset's
    # default (DEFAULT_AUGMENT), written out as its list once validated.
    augment: Union[bool, List[AugmentName]] = False
    # Scale augmentation: shorter side drawn from [lo, hi], then a random img_size crop.
    resize_range: Optional[Tuple[int, int]] = None

    @model_validator(mode="after")
    def _check(self) -> "DataParams":
        for field, users in _USED_BY.items():
            # A stored spec has every default written out, so only a value that
            # differs from the default is a mistake.
            value = getattr(self, field)
            if field in self.model_fields_set and value is not None \
                    and value != type(self).model_fields[field].default \
                    and self.dataset not in users:
                raise ValueError(f"data.{field}: only used by dataset {' / '.join(users)}, "
                                 f"not {self.dataset}")
        if isinstance(self.augment, list):
            ops = list(dict.fromkeys(self.augment))  # order-free set, kept readable
            if "hflip" in ops and self.dataset != "imagefolder":
                raise ValueError(f"data.augment: hflip is offered for imagefolder only: a mirrored digit is "
                                 f"not a digit (use [random_crop] for {self.dataset})")
            self.augment = ops or False
        elif self.augment is True and self.dataset in DEFAULT_AUGMENT:
            self.augment = list(DEFAULT_AUGMENT[self.dataset])
        if self.dataset == "imagefolder" and not self.path:
            raise ValueError("data.path: required for dataset imagefolder "
                             "(a folder with train/ and val/ subfolders)")
        if self.resize_range is not None:
            lo, hi = self.resize_range
            if not self.img_size <= lo <= hi:
                raise ValueError(
                    f"data.resize_range: need img_size <= lo <= hi, got img_size "
                    f"{self.img_size} and [{lo}, {hi}]")
            if not self.augment or "random_crop" not in self.augment:
                raise ValueError("data.resize_range: is the random_crop augmentation; "
                                 "set data.augment: [random_crop] (or true)")
            if self.dataset != "imagefolder":
                raise ValueError("data.resize_range: only used by dataset imagefolder")
        return self
