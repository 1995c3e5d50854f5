"""Checkpoints that resume exactly, written atomically (temp file + rename) so a crash
while saving never leaves a torn file behind.

The loop hands over the state of every part it owns (model, optimizer, schedule control
state, EMA, grad scaler, counters); this module adds the RNG state of torch, CUDA,
numpy and `random` (timm's mixup/cutmix draw from numpy's global RNG, dropout from
torch's), because an exact resume needs the same random stream as well.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({**state, "rng": rng_state()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint and restore the global RNG state it holds; the caller loads the
    rest into freshly built parts (rebuilt from the same spec)."""
    # weights_only=False: our own file holds numpy RNG arrays and plain dicts.
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state
