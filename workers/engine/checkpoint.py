"""Checkpoints that resume exactly, written atomically (temp file + rename) so a crash
while saving never leaves a torn file behind, and resumed only from the right lineage.

The loop hands over the state of every part it owns (model, optimizer, schedule control
state, EMA, grad scaler, counters); this module adds the RNG state of torch, CUDA,
numpy and `random` (timm's mixup/cutmix draw from numpy's global RNG, dropout from
torch's), because an exact resume needs the same random stream as well.

Layout: one directory per (store, experiment) lineage, chosen by the agent
(`<workdir>/<store_id>/exp-<id>/`), holding `ckpt-<step>-a<attempt>.pt` files. Several
are kept (not one `last.pt`): a resume must be able to go back to one whose metrics the
store holds (see `Lineage`), and a fenced attempt that kept training may have written
newer ones. Each file records its lineage, checked on load, so a file copied in from
another store or experiment is never resumed. A file that does not load is renamed
`*.corrupt` and the next older one is tried.

Files are read with `weights_only=True` (no pickled code runs): the RNG states are
stored as tensors and lists, not numpy objects.

This module imports torch only inside the functions that need it: the agent (which
never imports torch) uses the file-management half.
"""
from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from trainctl.workers.engine.context import Lineage

log = logging.getLogger(__name__)

KEEP_WHILE_TRAINING = 3  # newest checkpoints kept as resume points (more if the spec keeps more)
NAME_RE = re.compile(r"^ckpt-(\d+)-a(\d+)\.pt$")  # what checkpoint_name() makes


def checkpoint_name(step: int, attempt: int) -> str:
    return f"ckpt-{step}-a{attempt}.pt"


@dataclass(frozen=True)
class Found:
    path: Path
    step: int
    attempt: int


def checkpoint_dir(workdir: os.PathLike, store_id: str, experiment_id: int) -> Path:
    """Where one lineage's checkpoints live. An old server sends no store id: those runs
    share one "unknown-store" namespace (no worse than before, never another store's)."""
    store = re.sub(r"[^A-Za-z0-9_.-]", "_", store_id) or "unknown-store"
    return Path(workdir) / store / f"exp-{experiment_id}"


def list_checkpoints(directory: Path) -> list[Found]:
    """The checkpoints in `directory`, newest first (step, then attempt)."""
    out = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = NAME_RE.match(p.name)
            if m:
                out.append(Found(p, int(m.group(1)), int(m.group(2))))
    return sorted(out, key=lambda f: (f.step, f.attempt), reverse=True)


def drop_stale_temps(directory: Path) -> None:
    """Temp files left by a process killed mid-save: never complete, never needed."""
    if directory.is_dir():
        for p in directory.glob("*.tmp"):
            p.unlink(missing_ok=True)


def prune(directory: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; `keep` 0 removes them all and, when nothing
    else is left (corrupt files are kept for a look), the directory itself."""
    for f in list_checkpoints(directory)[keep:]:
        f.path.unlink(missing_ok=True)
    if keep == 0:
        drop_stale_temps(directory)
        try:
            directory.rmdir()
        except OSError:
            pass  # not empty (corrupt files), or gone


def forget_attempt(directory: Path, attempt: int) -> list[Path]:
    """A fenced attempt's checkpoints: it may have trained past what the store holds, so
    none of them is ever a resume source. Returns what was removed."""
    gone = [f.path for f in list_checkpoints(directory) if f.attempt == attempt]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


# ---------------------------------------------------------------------- torch side


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(directory: Path, state: dict[str, Any], lineage: Optional[Lineage], keep: int) -> Path:
    """Write `state` (with `step` and `epoch`) as this attempt's checkpoint, then prune
    to the newest `keep`."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    lin = lineage or Lineage()
    path = directory / checkpoint_name(state["step"], lin.attempt)
    tmp = path.with_suffix(".tmp")
    record = {"store_id": lin.store_id, "experiment_id": lin.experiment_id, "attempt": lin.attempt,
              "step": state["step"], "epoch": state["epoch"]}
    torch.save({**state, "lineage": record, "rng": rng_state()}, tmp)
    os.replace(tmp, path)
    prune(directory, keep)
    return path


def _read(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def why_not(state: dict[str, Any], lineage: Optional[Lineage]) -> Optional[str]:
    """Why a loaded checkpoint must not be resumed here, or None when it may."""
    rec = state.get("lineage")
    if not isinstance(rec, dict):
        return "it records no lineage (written by an older trainctl)"
    if lineage is None:
        return None
    if (rec.get("store_id"), rec.get("experiment_id")) != (lineage.store_id, lineage.experiment_id):
        return (f"it belongs to store {rec.get('store_id')!r} experiment {rec.get('experiment_id')}, "
                f"not store {lineage.store_id!r} experiment {lineage.experiment_id}")
    if lineage.delivered_steps is not None and rec["step"] > lineage.delivered_steps:
        return f"it is at step {rec['step']} but the server holds steps only up to {lineage.delivered_steps}"
    if lineage.delivered_epochs is not None and rec["epoch"] + 1 > lineage.delivered_epochs:
        return f"it ends epoch {rec['epoch']} but the server holds only {lineage.delivered_epochs} epoch rows"
    return None


def load_for_resume(directory: Path, lineage: Optional[Lineage], *, set_aside: bool = True,
                    note: Callable[[str], None] = lambda text: None) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint of `directory` this run may resume from, with its state
    (the global RNG state already restored), or None: train from scratch.

    Too new (past what the store holds) or of another lineage: skipped, left in place.
    Unreadable: renamed `*.corrupt` (when `set_aside`; DDP's other ranks only read) and
    reported through `note`, then the next older one is tried."""
    if set_aside:
        drop_stale_temps(directory)
    for found in list_checkpoints(directory):
        if lineage is not None and lineage.delivered_steps is not None and found.step > lineage.delivered_steps:
            log.info("checkpoint %s skipped: past step %d, the last the server holds", found.path.name,
                     lineage.delivered_steps)
            continue
        try:
            state = _read(found.path)
            reason = why_not(state, lineage)
        except FileNotFoundError:
            continue  # another rank set it aside meanwhile
        except Exception as exc:  # truncated, zeroed, not a zip, wrong types: all "unreadable"
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            if set_aside:
                bad = found.path.with_name(found.path.name + ".corrupt")
                os.replace(found.path, bad)
                note(f"checkpoint {found.path.name} is unreadable ({text}); set aside as {bad.name}")
            continue
        if reason is not None:
            log.warning("checkpoint %s not resumed: %s", found.path, reason)
            continue
        set_rng_state(state["rng"])
        return found.path, state
    return None
