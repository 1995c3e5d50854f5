"""Checkpoints every N epochs and exact resume: stopped + resumed == uninterrupted,
bit-for-bit on CPU, with live controls applied before and after the checkpoint."""
from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

from tests.test_loop_support import epoch_rows, make_trainer, one_thread, step_rows, tiny_spec  # noqa: F401
from trainctl.workers.engine.checkpoint import checkpoint_dir, forget_attempt, list_checkpoints, prune
from trainctl.workers.engine.context import Command, Lineage, ListSink, TrainingContext
from trainctl.workers.engine.loop import Cancelled, Trainer
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
    state = torch.load(tmp_path / "ckpt-8-a0.pt", weights_only=True)
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
    state = torch.load(tmp_path / "ckpt-4-a0.pt", weights_only=True)   # no pickled code needed
    assert (state["epoch"], state["step"]) == (1, 4)
    assert {"model", "optimizer", "schedule", "ema", "scaler", "rng", "best", "best_epoch"} <= set(state)
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert state["lineage"] == {"store_id": "", "experiment_id": 0, "attempt": 0, "step": 4, "epoch": 1}
    assert state["ema"]["base"] == 0.9 and state["ema"]["weights"]
    assert state["scaler"] is None        # bf16 needs no loss scaling
    assert state["schedule"] == trainer.schedule.state_dict()
    assert math.isclose(trainer.schedule.lr_at(1), 0.01)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_every_n_epochs_and_never(tmp_path):
    spec = tiny_spec(train={"epochs": 3, "checkpoint_every": 2, "max_steps_per_epoch": 1})
    trainer, _, _ = make_trainer(spec, checkpoint_dir=str(tmp_path / "a"))
    trainer.run()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["ckpt-2-a0.pt"]   # epoch 1, not 2: 3 % 2 != 0

    spec = tiny_spec(train={"epochs": 1, "checkpoint_every": 0, "max_steps_per_epoch": 1})
    trainer, _, _ = make_trainer(spec, checkpoint_dir=str(tmp_path / "b"))
    trainer.run()
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------- lineage (issue 10 items 1, 2, 4)

LIN = Lineage(store_id="store-a", experiment_id=1, attempt=1)


def _trained_dir(tmp_path, lineage=LIN, epochs=4, **train):
    """A finished 4-epoch run of 2 steps an epoch: checkpoints at steps 4, 6, 8 (the newest 3)."""
    spec = tiny_spec(train={"epochs": epochs, "max_steps_per_epoch": 2, **train})
    trainer = Trainer(spec, TrainingContext(checkpoint_dir=str(tmp_path), lineage=lineage))
    trainer.run()
    return spec


def _resume(tmp_path, spec, lineage):
    notes = []
    trainer = Trainer(spec, TrainingContext(checkpoint_dir=str(tmp_path), lineage=lineage, on_note=notes.append))
    trainer._maybe_resume()
    return trainer, notes


def test_checkpoints_are_kept_newest_few_and_record_their_lineage(tmp_path):
    _trained_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-4-a1.pt", "ckpt-6-a1.pt", "ckpt-8-a1.pt"]
    rec = torch.load(tmp_path / "ckpt-6-a1.pt", weights_only=True)["lineage"]
    assert rec == {"store_id": "store-a", "experiment_id": 1, "attempt": 1, "step": 6, "epoch": 2}


def test_resume_never_goes_past_what_the_server_holds(tmp_path):
    spec = _trained_dir(tmp_path)
    # everything delivered: the newest
    t, notes = _resume(tmp_path, spec, replace(LIN, attempt=2, delivered_steps=8, delivered_epochs=4))
    assert (t.start_epoch, t.step) == (4, 8) and "ckpt-8-a1.pt" in notes[0] and "attempt 1" in notes[0]
    # steps 0..6 stored: step 8's checkpoint holds training nobody saw
    t, _ = _resume(tmp_path, spec, replace(LIN, attempt=2, delivered_steps=7, delivered_epochs=4))
    assert (t.start_epoch, t.step) == (3, 6)
    # every step stored but the last epoch row lost: not that checkpoint either
    t, _ = _resume(tmp_path, spec, replace(LIN, attempt=2, delivered_steps=8, delivered_epochs=3))
    assert (t.start_epoch, t.step) == (3, 6)
    # nothing delivered (a first attempt, or all lost): scratch, and nothing was deleted
    t, notes = _resume(tmp_path, spec, replace(LIN, attempt=2, delivered_steps=0, delivered_epochs=0))
    assert (t.start_epoch, t.step) == (0, 0) and notes == []
    assert len(list(tmp_path.glob("ckpt-*.pt"))) == 3


def test_checkpoint_of_another_store_or_experiment_is_never_loaded(tmp_path):
    spec = _trained_dir(tmp_path)
    for other in (replace(LIN, store_id="store-b"), replace(LIN, experiment_id=2)):
        t, notes = _resume(tmp_path, spec, replace(other, attempt=2, delivered_steps=100, delivered_epochs=100))
        assert (t.start_epoch, t.step) == (0, 0) and notes == []
    # even renamed to look like this lineage's own newest file
    os.replace(tmp_path / "ckpt-8-a1.pt", tmp_path / "ckpt-9-a1.pt")
    t, _ = _resume(tmp_path, spec, replace(LIN, store_id="store-b", delivered_steps=100, delivered_epochs=100))
    assert t.step == 0


def test_corrupt_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path):
    spec = _trained_dir(tmp_path)
    newest = tmp_path / "ckpt-8-a1.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])   # truncated mid-write
    (tmp_path / "ckpt-6-a1.pt").write_bytes(b"\0" * 4096)                  # zeroed
    (tmp_path / "ckpt-10-a1.tmp").write_bytes(b"partial")                  # a killed save
    t, notes = _resume(tmp_path, spec, replace(LIN, attempt=2, delivered_steps=8, delivered_epochs=4))
    assert (t.start_epoch, t.step) == (2, 4)
    assert "ckpt-8-a1.pt is unreadable" in notes[0] and "set aside as ckpt-8-a1.pt.corrupt" in notes[0]
    assert "ckpt-6-a1.pt is unreadable" in notes[1] and "resumed from ckpt-4-a1.pt" in notes[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-4-a1.pt", "ckpt-6-a1.pt.corrupt",
                                                          "ckpt-8-a1.pt.corrupt"]


def test_resumed_from_an_older_checkpoint_equals_uninterrupted(tmp_path):
    full, full_sink, _ = make_trainer(tiny_spec(train={"epochs": 4, "max_steps_per_epoch": 2}))
    full.run()
    spec = _trained_dir(tmp_path)
    sink = ListSink()
    t = Trainer(spec, TrainingContext(sink=sink, checkpoint_dir=str(tmp_path),
                                      lineage=replace(LIN, attempt=2, delivered_steps=5, delivered_epochs=4)))
    t.run()
    assert min(step_rows(sink)) == 4
    assert step_rows(sink) == {s: v for s, v in step_rows(full_sink).items() if s >= 4}


def test_checkpoint_files_are_listed_forgotten_and_pruned(tmp_path):
    d = checkpoint_dir(tmp_path, "st/../x", 3)
    assert d == tmp_path / "st_.._x" / "exp-3"          # a store id cannot climb out of the workdir
    assert checkpoint_dir(tmp_path, "", 3) == tmp_path / "unknown-store" / "exp-3"
    d.mkdir(parents=True)
    for name in ("ckpt-2-a1.pt", "ckpt-4-a1.pt", "ckpt-4-a2.pt", "ckpt-6-a2.pt", "x.tmp"):
        (d / name).write_bytes(b"x")
    assert [(f.step, f.attempt) for f in list_checkpoints(d)] == [(6, 2), (4, 2), (4, 1), (2, 1)]
    assert [p.name for p in forget_attempt(d, 2)] == ["ckpt-6-a2.pt", "ckpt-4-a2.pt"]
    prune(d, 1)
    assert sorted(p.name for p in d.iterdir()) == ["ckpt-4-a1.pt", "x.tmp"]
    prune(d, 0)
    assert not d.exists()
