"""The job spec: a YAML with a top-level `command`, run as a CODE experiment.

    name: mlp-code                          # default (client side): the code folder's name
    command: python train.py --epochs 100   # /bin/sh -c in the unpacked folder
    resources: {gpus: 0, memory_gb: null}   # memory_gb: the command's address-space cap
    env: {FOO: bar}
    max_restarts: 3
    tags: [a, b]
    keep_checkpoints: 3
    cancel_grace_s: 10

The server validates it with `parse_job` (a SpecError naming each bad field, answered as
INVALID_ARGUMENT) and stores the result, with `code_sha256` set by the server from the
SubmitRequest, as the experiment's spec. Torch-free, like trainctl.spec.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainctl.spec import ERROR_MESSAGES, SpecError, raw_fault_lines
from trainctl.spec_checks import MAX_ERRORS, suggest_key

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names the worker sets for the SDK inside the command: a job may not override them.
RESERVED_ENV_PREFIX = "TRAINCTL_"
MAX_ENV = 200
MAX_COMMAND = 4096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobResources(_Strict):
    gpus: int = Field(0, ge=0, le=64)
    memory_gb: Optional[float] = Field(None, gt=0, le=4096)   # RLIMIT_AS of the command


class JobSpec(_Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    command: str = Field(min_length=1, max_length=MAX_COMMAND)
    resources: JobResources = JobResources()
    env: dict[str, str] = Field(default_factory=dict)
    max_restarts: int = Field(3, ge=0, le=100)
    tags: list[str] = Field(default_factory=list, max_length=32)
    keep_checkpoints: int = Field(3, ge=1, le=1000)
    cancel_grace_s: float = Field(10.0, ge=0, le=3600)
    code_sha256: Optional[str] = None   # set by the server; a user's value is replaced

    @field_validator("command")
    @classmethod
    def _command(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        if "\x00" in v:
            raise ValueError("must not contain a NUL character")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_ENV:
            raise ValueError(f"at most {MAX_ENV} variables, got {len(v)}")
        for k, val in v.items():
            if not ENV_NAME_RE.match(k):
                raise ValueError(f"{k!r} is not a valid environment variable name")
            if k.startswith(RESERVED_ENV_PREFIX):
                raise ValueError(f"{k!r}: names starting with {RESERVED_ENV_PREFIX} are set by the worker")
            if "\x00" in val:
                raise ValueError(f"{k}: the value must not contain a NUL character")
        return v

    @field_validator("code_sha256")
    @classmethod
    def _sha(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not SHA256_RE.match(v):
            raise ValueError("must be 64 lowercase hex digits")
        return v

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with every default filled in (what the server stores)."""
        return self.model_dump(mode="json", exclude_none=True)


def is_job(data: Any) -> bool:
    """A job spec (run the user's command) rather than a spec for the built-in trainer."""
    return isinstance(data, dict) and "command" in data


def _coerce(data: dict) -> dict:
    """A protobuf Struct makes every number a double: give integral ones back as int, and
    env values given as numbers in YAML (`SEED: 1`) as the strings a process sees."""
    out = {k: (int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**53 else v) for k, v in data.items()}
    if isinstance(out.get("resources"), dict):
        out["resources"] = {k: (int(v) if k == "gpus" and isinstance(v, float) and v.is_integer() else v)
                            for k, v in out["resources"].items()}
    env = out.get("env")
    if isinstance(env, dict):
        out["env"] = {k: (_env_str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                      for k, v in env.items()}
    return out


def _env_str(v: float) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _format_error(err: dict[str, Any]) -> str:
    """``field.path: problem, got value`` from one pydantic error."""
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "job"
    kind, ctx = err["type"], err.get("ctx", {})
    template = ERROR_MESSAGES.get(kind)
    msg = template.format(**{k: (f"{v:g}" if isinstance(v, float) else v) for k, v in ctx.items()}) \
        if template else err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden" and loc:
        msg += suggest_key(JobSpec, loc[:-1], str(loc[-1]))
        if not loc[:-1] and str(loc[-1]) in ("model", "data", "optimizer", "schedule", "train", "loss", "control"):
            msg += " (a job spec runs your `command`; the built-in trainer's sections belong in a spec without one)"
    inp = err.get("input")
    if kind not in ("missing", "extra_forbidden") and not isinstance(inp, (dict, list)):
        text = repr(inp)
        msg += f", got {text if len(text) <= 80 else text[:60] + '...'}"
    return f"{path}: {msg}"


def parse_job(data: Any) -> JobSpec:
    """Validate a job spec given as a dict; SpecError with one ``field: problem`` per fault."""
    faults = raw_fault_lines(data, "job")
    try:
        job = JobSpec.model_validate(_coerce(data))
    except ValidationError as exc:
        flagged = {f.split(": ", 1)[0] for f in faults}
        for err in exc.errors():
            line = _format_error(err)
            if line.split(": ", 1)[0] not in flagged:
                faults.append(line)
        job = None
    if faults or job is None:
        raise SpecError(list(dict.fromkeys(faults))[:MAX_ERRORS])
    return job
