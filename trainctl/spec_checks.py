"""Checks on a spec that pydantic's per-field rules do not make: bounded size, finite
numbers in range, and "did you mean" hints for unknown keys.

Why a separate pass: a spec arrives from the network, so its size is hostile input
(a 40 MB `model.kwargs` string once broke every List); pydantic's `ge=0` accepts `inf`;
and an unknown key is best answered with the key the user meant, found by walking the
declared models. Everything here works on plain dicts and pydantic classes (torch-free).
"""
from __future__ import annotations

import difflib
import math
import typing
from typing import Any, Iterator

from pydantic import BaseModel

# Limits on what a spec may hold (checked before validation, so a huge input costs one
# walk, never a pydantic model). A real spec is a few KB; 10,000 scheduled commands are
# ~0.5 MB on the wire.
MAX_SPEC_BYTES = 1 << 20          # serialized size (protobuf Struct, or JSON)
MAX_STRING = 4096                 # characters in any one string (PATH_MAX)
MAX_DEPTH = 12                    # nesting of mappings/lists
MAX_ITEMS = 10_000                # entries of any one mapping or list
MAX_ERRORS = 20                   # faults listed in one answer
# Every float in a validated spec is finite and |x| <= FLOAT_MAX unless its field states
# a tighter range; learning rates (any field named *lr) are capped like optimizer.lr.
FLOAT_MAX = 1e6
LR_MAX = 100.0
INT_MAX = 2 ** 53                 # integers exact in a double (a Struct carries doubles)


class TooBig(ValueError):
    """The spec exceeds a size limit; validating it further is not worth the CPU."""


def raw_faults(data: Any) -> list[tuple[str, str]]:
    """(path, problem) for every non-finite number, over-long string, too-deep or too-wide
    container in raw spec data. Raises TooBig when the whole is over MAX_SPEC_BYTES."""
    faults: list[tuple[str, str]] = []
    size = 0

    def walk(v: Any, path: str, depth: int) -> None:
        nonlocal size
        if len(faults) >= MAX_ERRORS:
            return
        if isinstance(v, dict) or isinstance(v, list):
            size += 2
            if depth > MAX_DEPTH:
                faults.append((path, f"nested more than {MAX_DEPTH} levels deep; the limit is {MAX_DEPTH}"))
                return
            if len(v) > MAX_ITEMS:
                faults.append((path, f"{len(v):,} entries; the limit is {MAX_ITEMS:,}"))
                return
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                key = str(k)
                size += len(key) + 4
                if len(key) > MAX_STRING:
                    faults.append((path or "spec", f"a key of {len(key):,} characters; the limit is {MAX_STRING:,}"))
                    continue
                walk(x, f"{path}.{key}" if path else key, depth + 1)
                if size > MAX_SPEC_BYTES:
                    raise TooBig(f"spec: more than {MAX_SPEC_BYTES:,} bytes; the limit is "
                                 f"{MAX_SPEC_BYTES:,} (1 MiB)")
        elif isinstance(v, str):
            size += len(v) + 2
            if len(v) > MAX_STRING:
                faults.append((path, f"a string of {len(v):,} characters; the limit is {MAX_STRING:,}"))
        else:
            size += 8
            if isinstance(v, float) and not math.isfinite(v):
                faults.append((path, f"must be a finite number, got {v}"))

    walk(data, "", 0)
    return faults


def range_faults(model: BaseModel) -> list[tuple[str, str]]:
    """(path, problem) for each float of a validated spec outside the global ranges."""
    out = []
    for path, name, v in _numbers(model, ""):
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            if abs(v) > INT_MAX:
                out.append((path, f"must be within +-2**53 ({INT_MAX:,}), got {v}"))
        elif not math.isfinite(v):
            out.append((path, f"must be a finite number, got {v}"))
        elif name.endswith("lr") and abs(v) > LR_MAX:
            out.append((path, f"must be <= {LR_MAX:g} (a learning rate), got {v:g}"))
        elif abs(v) > FLOAT_MAX:
            out.append((path, f"must be within +-{FLOAT_MAX:g}, got {v:g}"))
    return out


def _numbers(v: Any, path: str, name: str = "") -> Iterator[tuple[str, str, Any]]:
    if isinstance(v, BaseModel):
        for field in type(v).model_fields:
            yield from _numbers(getattr(v, field), f"{path}.{field}" if path else field, field)
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _numbers(x, f"{path}.{k}", str(k))
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            yield from _numbers(x, f"{path}.{i}", name)
    elif isinstance(v, (int, float)):
        yield path, name, v


# ---------------------------------------------------------------- unknown-key hints

def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, Union, Annotated, list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        for m in _models_in(arg):
            if m not in out:
                out.append(m)
    return out


def _tag(model: type[BaseModel]) -> str | None:
    f = model.model_fields.get("name")
    args = typing.get_args(f.annotation) if f is not None else ()
    return args[0] if len(args) == 1 and isinstance(args[0], str) else None


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class that pydantic error location `loc` (without the key) points into.
    A tagged union's location carries the tag after the field ("schedule", "cosine")."""
    cls: type[BaseModel] | None = root
    i = 0
    while i < len(loc):
        comp = loc[i]
        i += 1
        if isinstance(comp, int):
            continue  # a list index
        f = cls.model_fields.get(comp) if cls is not None else None
        if f is None:
            return None
        models = _models_in(f.annotation)
        if len(models) == 1:
            cls = models[0]
        elif models and i < len(loc):
            cls = next((m for m in models if _tag(m) == loc[i]), None)
            i += 1
        else:
            return None
    return cls


def _all_paths(cls: type[BaseModel], prefix: str = "", depth: int = 0) -> Iterator[str]:
    for name, f in cls.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        yield path
        if depth < 3:
            for m in _models_in(f.annotation):
                yield from _all_paths(m, path, depth + 1)


def suggest_key(root: type[BaseModel], loc: tuple, key: str) -> str:
    """' ; did you mean X?' for an unknown `key` at `loc`, or ''."""
    here = model_at(root, loc)
    if here is not None:
        close = difflib.get_close_matches(key, list(here.model_fields), n=1, cutoff=0.75)
        if close:
            parent = ".".join(str(c) for c in user_loc(root, loc))
            return f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
    # Elsewhere: the same key in another section ("epochs" at top level is train.epochs);
    # a near miss only when the location itself is unknown.
    parent = ".".join(str(c) for c in user_loc(root, loc) if not isinstance(c, int))
    paths = [p for p in dict.fromkeys(_all_paths(root)) if here is None or p.rpartition(".")[0] != parent]
    same = [p for p in paths if p.rsplit(".", 1)[-1] == key or p == key]
    if not same and here is None:
        lasts = {p.rsplit(".", 1)[-1] for p in paths}
        near = set(difflib.get_close_matches(key, sorted(lasts), n=2, cutoff=0.85))
        same = [p for p in paths if p.rsplit(".", 1)[-1] in near]
    return f"; did you mean {' or '.join(same[:3])}?" if same else ""


def user_loc(root: type[BaseModel], loc: tuple) -> list:
    """`loc` without the tags pydantic inserts after tagged-union fields."""
    out, cls, i = [], root, 0
    while i < len(loc):
        comp = loc[i]
        out.append(comp)
        i += 1
        if isinstance(comp, int) or cls is None:
            continue
        f = cls.model_fields.get(comp)
        models = _models_in(f.annotation) if f is not None else []
        if len(models) == 1:
            cls = models[0]
        elif models and i < len(loc):
            cls = next((m for m in models if _tag(m) == loc[i]), None)
            i += 1  # skip the tag
        else:
            cls = None
    return out
