"""The experiment spec, typed once.

YAML for people, a `google.protobuf.Struct` on the wire, and these pydantic models
everywhere in between. `parse_spec` is the single entry point: it rejects unknown
keys and out-of-range values with the field path in the message, e.g.
``schedule.warmup_epochs: must be >= 0, got -1``.

This module and everything it imports stay torch-free: the server validates specs
without the training stack.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from trainctl.controls import SPEC_VERBS
from trainctl.params.loss import LossParams
from trainctl.params.model_data import DataParams, ModelParams
from trainctl.schedules import ScheduleParams
from trainctl.spec_checks import FLOAT_MAX, MAX_ERRORS, TooBig, raw_faults, range_faults, suggest_key, user_loc


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerParams(_Strict):
    name: Literal["sgd", "adamw", "adam", "rmsprop"] = "sgd"
    lr: float = Field(0.1, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class EmaParams(_Strict):
    decay: float = Field(0.9998, gt=0, lt=1)
    warmup: bool = False          # timm ModelEmaV3 warmup: decay ramps up to `decay`
    # BYOL-style schedule towards 1.0 over the run: tau_k = 1 - (1 - decay)(cos(pi k/K) + 1)/2.
    cosine_to_one: bool = False


class MixupParams(_Strict):
    mixup_alpha: float = Field(0.8, ge=0)
    cutmix_alpha: float = Field(1.0, ge=0)
    prob: float = Field(1.0, ge=0, le=1)
    switch_prob: float = Field(0.5, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    off_epoch: Optional[int] = Field(None, ge=0)   # mixup stops from this epoch on

    @model_validator(mode="after")
    def _some_mixing(self) -> "MixupParams":
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mixup_alpha or cutmix_alpha must be > 0 (drop the section to turn mixing off)")
        return self


class MultiScaleParams(_Strict):
    """Progressive multi-scale batches: each optimizer step trains at one size from
    `resize_range` (both ends included, in steps of 16), chosen every `every` steps.
    The first `every` steps use the largest size so peak memory shows at once."""

    resize_range: tuple[int, int]
    every: int = Field(10, ge=1)

    @field_validator("resize_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if not 16 <= lo <= hi or (hi - lo) % 16:
            raise ValueError(f"need 16 <= lo <= hi with hi - lo a multiple of 16, got {list(v)}")
        return v


class TrainParams(_Strict):
    epochs: int = Field(10, ge=1, le=100_000)
    seed: int = Field(0, ge=0)
    amp: Union[bool, Literal["bf16", "fp16"]] = False     # true = bf16; fp16 needs CUDA
    clip_grad: Optional[float] = Field(None, gt=0)
    clip_mode: Literal["norm", "value", "agc"] = "norm"
    grad_accum: int = Field(1, ge=1, le=1024)
    ema: Optional[EmaParams] = None
    mixup: Optional[MixupParams] = None
    multiscale: Optional[MultiScaleParams] = None
    channels_last: bool = False
    # true = inductor; "aot_eager" / "eager" are torch.compile's debugging backends.
    compile: Union[bool, Literal["inductor", "aot_eager", "eager"]] = False
    deterministic: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Cap on optimizer steps per epoch (0 = the whole dataset); handy for smoke runs.
    max_steps_per_epoch: int = Field(0, ge=0)
    checkpoint_every: int = Field(1, ge=0)        # epochs; 0 = never
    keep_checkpoints: int = Field(0, ge=0, le=1000)  # newest kept after COMPLETED (0 = delete them)
    on_nonfinite: Literal["fail", "skip"] = "fail"

    def steps_per_epoch(self, train_batches: int, batch_size: int) -> int:
        """Optimizer steps in an epoch of `train_batches` loader batches: the one rule the
        loop, `schedule preview` and the demo share. ValueError when none fits."""
        steps = train_batches // self.grad_accum
        if self.max_steps_per_epoch:
            steps = min(steps, self.max_steps_per_epoch)
        if steps < 1:
            raise ValueError(f"data.batch_size: {batch_size} x train.grad_accum {self.grad_accum} "
                             f"leaves no full optimizer step in an epoch of {train_batches} batches")
        return steps


# The verbs a spec may schedule (every ControlKind but those naming a target, see
# trainctl.controls): one optional field each on ControlEntry.
CONTROL_VERBS: tuple[str, ...] = SPEC_VERBS


class _ControlEntry(_Strict):
    """A command scheduled in the spec: exactly one verb, applied at `at_step`."""

    at_step: int = Field(ge=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> "_ControlEntry":
        given = [v for v in CONTROL_VERBS if getattr(self, v) is not None]
        if len(given) != 1:
            raise ValueError(f"exactly one of {', '.join(CONTROL_VERBS)} is required, got {given or 'none'}")
        check_control_value(given[0], getattr(self, given[0]))
        return self

    @property
    def verb(self) -> str:
        return next(v for v in CONTROL_VERBS if getattr(self, v) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.verb))


ControlEntry = create_model("ControlEntry", __base__=_ControlEntry, __module__=__name__,
                            **{verb: (Optional[float], None) for verb in CONTROL_VERBS})


class Resources(_Strict):
    gpus: int = Field(0, ge=0, le=64)
    nproc: int = Field(1, ge=1, le=64)
    nnodes: int = Field(1, ge=1, le=64)


class Spec(_Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    model: ModelParams
    data: DataParams
    optimizer: OptimizerParams = OptimizerParams()
    # Defaults are given as spec dicts and validated like user input, so they become the
    # same typed params objects.
    schedule: ScheduleParams = Field(default_factory=lambda: {"name": "constant"},  # type: ignore[assignment]
                                     validate_default=True)
    loss: LossParams = Field(default_factory=lambda: {"name": "cross_entropy"},  # type: ignore[assignment]
                             validate_default=True)
    train: TrainParams = TrainParams()
    control: list[ControlEntry] = Field(default_factory=list, max_length=10_000)
    resources: Resources = Resources()
    max_restarts: int = Field(3, ge=0, le=100)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with every default filled in."""
        return self.model_dump(mode="json", exclude_none=True)


class SpecError(ValueError):
    """An invalid spec; `errors` holds one ``field.path: problem`` line per fault."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


# Stated ranges of live and scheduled commands: a value outside them is refused at
# Submit/Control (INVALID_ARGUMENT), never sent to a run (`scale_lr 1e308` once
# overflowed a run's LR to inf and killed it).
CONTROL_RANGES: dict[str, tuple[float, float, bool]] = {  # verb: (low, high, low inclusive)
    "set_lr": (0.0, 100.0, False),           # like optimizer.lr
    "scale_lr": (0.0, 1000.0, False),
    "set_lr_decay": (0.0, 1.0, False),
    "set_ema_decay": (0.0, 1.0, False),
    "set_weight_decay": (0.0, 1.0, True),    # 0 switches weight decay off
}
assert set(CONTROL_RANGES) == set(CONTROL_VERBS), "every spec verb states its range"


def check_control_value(verb: str, value: float) -> None:
    """Range rules shared by spec entries and live Control calls (ValueError naming the
    verb, the value and the range)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{verb} must be a finite number, got {value}")
    low, high, closed = CONTROL_RANGES.get(verb, (-FLOAT_MAX, FLOAT_MAX, True))
    if value > high or value < low or (value == low and not closed):
        raise ValueError(f"{verb} must be in {'[' if closed else '('}{low:g}, {high:g}], got {value:g}")


# pydantic error kinds as short messages (also jobspec.py's).
ERROR_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "extra_forbidden": "unknown key",
    "missing": "required",
}


def _format_error(err: dict[str, Any]) -> str:
    kind = err["type"]
    raw_loc = tuple(err["loc"])
    # pydantic puts the discriminator value into tagged-union paths
    # ("schedule.cosine.min_lr"); users wrote "schedule.min_lr".
    path = ".".join(str(p) for p in user_loc(Spec, raw_loc)) or "spec"
    ctx = err.get("ctx", {})
    if kind == "union_tag_invalid":
        tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        close = difflib.get_close_matches(str(ctx.get("tag")), tags, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{path}.name: unknown {path} {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}{hint}"
    if kind == "union_tag_not_found":
        return f"{path}.name: required"
    template = ERROR_MESSAGES.get(kind)
    nums = {k: (f"{v:g}" if isinstance(v, float) else v) for k, v in ctx.items()}
    msg = template.format(**nums) if template else err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden" and raw_loc:
        msg += suggest_key(Spec, raw_loc[:-1], str(raw_loc[-1]))
    if msg.startswith((f"{path}.", f"{path}:")):  # a model validator that names its own field
        return msg
    inp = err.get("input")
    if kind not in ("missing", "extra_forbidden") and not isinstance(inp, (dict, list)):
        msg += f", got {_short(inp)}"
    return f"{path}: {msg}"


def raw_fault_lines(data: Any, what: str) -> list[str]:
    """The size and finiteness faults of a spec or job given as a dict, as ``field: problem``
    lines (spec_checks.raw_faults); SpecError at once for no mapping or one too big to check."""
    if not isinstance(data, dict):
        raise SpecError([f"{what}: must be a mapping, got {type(data).__name__}"])
    try:
        return [f"{path}: {problem}" for path, problem in raw_faults(data)]
    except TooBig as exc:
        raise SpecError([str(exc)]) from None


def _short(value: Any) -> str:
    """repr of a bad value, cut so an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def parse_spec(data: Any, *, check_model: bool = True) -> Spec:
    """Validate a spec given as a dict (from YAML, JSON or a protobuf Struct).

    Every fault is reported at once (SpecError.errors): size and range faults, pydantic's,
    and an unknown model name alongside the others."""
    faults = raw_fault_lines(data, "spec")
    flagged = {line.split(": ", 1)[0] for line in faults}
    spec = None
    try:
        spec = Spec.model_validate(_ints_from_floats(data))
    except ValidationError as exc:
        # A path already flagged above (an inf that pydantic's ge=0 let through, or
        # rejected again as "got nan") is reported once.
        faults += [line for line in map(_format_error, exc.errors()) if not _flagged(line, flagged)]
    if spec is not None:
        faults += [f"{path}: {problem}" for path, problem in range_faults(spec)]
    if check_model:
        name = data.get("model", {}).get("name") if isinstance(data.get("model"), dict) else None
        if isinstance(name, str) and name and not any(line.startswith("model.name:") for line in faults):
            faults += _model_name_faults(name)
    if faults:
        raise SpecError(_dedupe(faults)[:MAX_ERRORS])
    return spec


def _flagged(line: str, flagged: set[str]) -> bool:
    path = line.split(": ", 1)[0]
    return path in flagged or ("finite" in line and any(f.startswith(path + ".") for f in flagged))


def _dedupe(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def _ints_from_floats(value: Any) -> Any:
    """A protobuf Struct carries every number as a double; give integral ones back as int
    so `epochs: 10.0` validates as an int and `epochs: 2.5` is still refused."""
    if isinstance(value, dict):
        return {k: _ints_from_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints_from_floats(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _model_name_faults(name: str) -> list[str]:
    from trainctl.params.model_names import known_model, suggest_models

    if known_model(name):
        return []
    hint = suggest_models(name)
    extra = f"; did you mean {', '.join(hint)}?" if hint else ""
    return [f"model.name: unknown timm model {name!r}{extra}"]


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML/JSON spec file into a plain dict (not validated: the server does that)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise SpecError([f"spec file {str(p)!r} does not exist"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{p}: not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{p}: the spec must be a mapping at top level"])
    return data
