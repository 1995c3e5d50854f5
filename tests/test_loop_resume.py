"""Checkpoints every N epochs and exact resume: stopped + resumed == uninterrupted,
bit-for-bit on CPU, with live controls applied before and after the checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

from tests.test_loop_support import epoch_rows, make_trainer, one_thread, step_rows, tiny_spec  # noqa: F401
from trainctl.workers.engine.context import Command
from trainctl.workers.engine.loop import Cancelled
from trainctl.workers.engine.replay import commands_from_log, control_log

pytestmark = pytest.mark.usefixtures("one_thread")

# Everything that carries state across a checkpoint: EMA with the cosine decay schedule,
# mixup (numpy RNG) until epoch 3, dropout (torch RNG), multi-scale sizes, weight decay.
SPEC = dict(
    train={"epochs": 4, "checkpoint_every": 2, "max_steps_per_epoch": 4, "seed": 3,
           "ema": {"decay": 0.9, "cosine_to_one": True},
           "mixup": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "prob": 0.8, "off_epoch": 3},
           "multiscale": {"resize_range": [16, 32], "every": 3}, "clip_grad": 2.0},
    model={"name": "test_resnet", "drop_rate": 0.2},
)
LIVE = {2: Command("before", "scale_lr", 0.5),        # applied at step 3, before the checkpoint (step 8)
        9: Command("after", "set_ema_decay", 0.95),   # applied at step 10, after it
        10: Command("wd", "set_weight_decay", 0.01)}  # applied at step 11


def _steer(cancel_at=None):
    sent = []

    def on_step(step, inbox):
        if step in LIVE:
            sent.append(LIVE[step])
            inbox.put(LIVE[step])
        if step == cancel_at:
            inbox.cancel("test stop")
    return on_step, sent


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path):
    on_step, _ = _steer()
    full, full_sink, full_inbox = make_trainer(tiny_spec(**SPEC), on_step=on_step)
    full_summary = full.run()

    # Interrupted: stops during epoch 3 (after the "after" controls were applied), so
    # the last checkpoint is the one at the end of epoch 2 (step 8).
    on_step, sent = _steer(cancel_at=12)
    first, first_sink, first_inbox = make_trainer(tiny_spec(**SPEC), on_step=on_step, checkpoint_dir=str(tmp_path))
    with pytest.raises(Cancelled):
        first.run()
    assert [a.applied_step for a in first_inbox.acks] == [3, 10, 11]
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 8)

    # What the agent hands a resumed attempt: every applied command, scheduled at its step.
    scheduled = commands_from_log(control_log(sent, first_inbox.acks))
    resumed, resumed_sink, resumed_inbox = make_trainer(tiny_spec(**SPEC), scheduled=scheduled,
                                                        checkpoint_dir=str(tmp_path))
    summary = resumed.run()

    # The pre-checkpoint command is inside the checkpoint; only the later ones re-apply.
    assert [(a.command_id, a.applied_step) for a in resumed_inbox.acks] == [("after", 10), ("wd", 11)]
    assert resumed_inbox.acks == full_inbox.acks[1:]
    full_steps = step_rows(full_sink)
    assert step_rows(resumed_sink) == {s: v for s, v in full_steps.items() if s >= 8}
    assert step_rows(first_sink) == {s: v for s, v in full_steps.items() if s <= 12}
    full_epochs = epoch_rows(full_sink)
    assert epoch_rows(resumed_sink) == {e: v for e, v in full_epochs.items() if e >= 2}
    assert {k: v for k, v in summary.as_dict().items() if k != "seconds"} == \
        {k: v for k, v in full_summary.as_dict().items() if k != "seconds"}
    for p, q in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(p, q)
    for p, q in zip(full.ema.module.state_dict().values(), resumed.ema.module.state_dict().values()):
        assert torch.equal(p, q)


def test_checkpoint_holds_every_part_of_the_state(tmp_path):
    spec = tiny_spec(train={"epochs": 2, "checkpoint_every": 1, "max_steps_per_epoch": 2,
                            "ema": {"decay": 0.9}, "amp": "bf16"})
    trainer, _, _ = make_trainer(spec, scheduled=[Command("c", "set_lr", 0.01, at_step=1)],
                                 checkpoint_dir=str(tmp_path))
    trainer.run()
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 4)
    assert {"model", "optimizer", "schedule", "ema", "scaler", "rng", "best", "best_epoch"} <= set(state)
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert state["ema"]["base"] == 0.9 and state["ema"]["weights"]
    assert state["scaler"] is None        # bf16 needs no loss scaling
    assert state["schedule"] == trainer.schedule.state_dict()
    assert math.isclose(trainer.schedule.lr_at(1), 0.01)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_every_n_epochs_and_never(tmp_path):
    spec = tiny_spec(train={"epochs": 3, "checkpoint_every": 2, "max_steps_per_epoch": 1})
    trainer, _, _ = make_trainer(spec, checkpoint_dir=str(tmp_path / "a"))
    trainer.run()
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=False)["epoch"] == 1   # not 2: 3 % 2 != 0

    spec = tiny_spec(train={"epochs": 1, "checkpoint_every": 0, "max_steps_per_epoch": 1})
    trainer, _, _ = make_trainer(spec, checkpoint_dir=str(tmp_path / "b"))
    trainer.run()
    assert not (tmp_path / "b").exists()
