"""Which files a spec may make this worker read: paths under its data roots only.

A spec comes from whoever holds a client token; without this, `data.path: /root` or
`model.weights: ../../etc/shadow` would have the worker open any file it can read, and
the failure message would tell whether the file exists. So every path a spec names is
resolved (symlinks and `..` followed, relative paths against the worker's cwd) and must
lie under one of the roots, checked before anything is opened; a path outside gets the
same message whether or not it exists.

Roots: `trainctl worker --data-root DIR` (repeatable) or TRAINCTL_DATA_ROOT (paths
separated by `:`). With none given, the worker's current directory is the one root:
the built-in datasets (digits, digits_lt, synthetic) read no files, so only
imagefolder data and local weights files need a root.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence


class OutsideDataRoots(ValueError):
    """A spec path outside every data root (a ValueError: the run FAILS with it)."""


def resolve_roots(roots: Optional[Iterable[str]]) -> list[str]:
    """The roots as absolute, symlink-free paths; the cwd when none are given."""
    given = [r for r in (roots or []) if r]
    return [os.path.realpath(r) for r in (given or [os.getcwd()])]


def check_path(field: str, path: str, roots: Sequence[str]) -> str:
    """`path` resolved, when it lies under a root; OutsideDataRoots otherwise. The
    message names the field and the path as given, never what is (or is not) there."""
    resolved = os.path.realpath(path)
    for root in roots:
        if resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep):
            return resolved
    raise OutsideDataRoots(f"{field}: {path!r} is outside this worker's data roots ({', '.join(roots)}); "
                           "start the worker with --data-root DIR to allow a directory")


def check_spec(spec, roots: Sequence[str]) -> None:
    """Every path `spec` names (data.path, model.weights) is under a root."""
    data_path = getattr(spec.data, "path", None)
    if data_path:
        check_path("data.path", data_path, roots)
    weights = getattr(spec.model, "weights", None)
    if weights:
        check_path("model.weights", weights, roots)
