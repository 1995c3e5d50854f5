"""Regenerate the schedule preview plots in docs/img/ (used by docs/schedules.md).

    python docs/make_previews.py

Each plot is `trainctl schedule preview --png` of a 30-epoch run with 20 steps per epoch
and one live-style control (`scale_lr 0.5` at epoch 15), so the page also shows how a
schedule keeps its shape after an LR change.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SCHEDULES = {
    "constant": {},
    "step": {"step_size": 10, "gamma": 0.3},
    "multistep": {"milestones": [10, 20, 25], "gamma": 0.3},
    "exponential": {"gamma": 0.9},
    "cosine": {"warmup_epochs": 3, "warmup_lr": 0.001, "min_lr": 0.001, "t_initial": 10, "cycle_limit": 3,
               "cycle_decay": 0.7},
    "tanh": {"warmup_epochs": 3, "warmup_lr": 0.001, "min_lr": 0.001},
    "poly": {"power": 2.0, "warmup_epochs": 2, "warmup_lr": 0.001},
    "linear": {"start_factor": 1.0, "end_factor": 0.05, "total_iters": 25},
    "cosine_restarts": {"T_0": 5, "T_mult": 2, "eta_min": 0.001},
    "onecycle": {"pct_start": 0.3},
    "plateau": {"factor": 0.5, "patience": 2},
    "gradual_warmup": {"multiplier": 2.0, "total_epoch": 5, "after": {"name": "cosine", "min_lr": 0.001}},
    "cawb": {"steps": [10, 20], "step_scale": 0.6, "eta_min": 0.05, "warmup_epoch": 2},
}


def main() -> int:
    (HERE / "img").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, params in SCHEDULES.items():
            spec = {"name": f"preview-{name}", "model": {"name": "resnet10t"}, "data": {"dataset": "digits"},
                    "optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"name": name, **params},
                    "train": {"epochs": 30}, "control": [{"at_step": 300, "scale_lr": 0.5}]}
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(spec))
            out = HERE / "img" / f"schedule-{name}.png"
            subprocess.run([sys.executable, "-m", "trainctl.client.cli", "schedule", "preview", str(path),
                            "--steps-per-epoch", "20", "--png", str(out)], check=True, stdout=subprocess.DEVNULL)
            print(f"wrote {out.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
