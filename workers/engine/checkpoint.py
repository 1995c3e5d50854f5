"""Checkpoints that resume exactly: model, optimizer, schedule control state, EMA,
grad scaler and RNG state, written atomically (temp file + rename) so a crash while
saving never leaves a torn file behind."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch


def save_checkpoint(path: Path, *, epoch: int, step: int, best: float, model, optimizer, schedule,
                    ema: Optional[Any] = None, scaler: Optional[Any] = None) -> None:
    state = {
        "epoch": epoch, "step": step, "best": best,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "ema_decay": float(ema.decay) if ema is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, *, model, optimizer, schedule, ema=None, scaler=None) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
        ema.decay = state["ema_decay"]
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state
