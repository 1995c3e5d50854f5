"""Helpers for the loop tests (no tests here): tiny specs that train in a fraction of a
second on one CPU thread, and a sink that can steer the run from its step rows."""
from __future__ import annotations

import copy
from typing import Callable, Optional

import pytest
import torch

from trainctl.spec import parse_spec
from trainctl.workers.engine.context import EPOCH, STEP, ControlInbox, ListSink, TrainingContext
from trainctl.workers.engine.loop import Trainer


@pytest.fixture
def one_thread():
    # Two shared cores: torch's intra-op pool only adds contention at these sizes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_spec_dict(*, train: Optional[dict] = None, **sections) -> dict:
    spec = {
        "name": "tiny",
        "model": {"name": "test_resnet"},
        "data": {"dataset": "digits", "batch_size": 32, "img_size": 16},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 1, "warmup_lr": 0.005, "min_lr": 1e-4},
        "loss": {"name": "cross_entropy", "label_smoothing": 0.1},
        "train": {"epochs": 2, "seed": 0, "max_steps_per_epoch": 4, "device": "cpu"},
    }
    spec["train"].update(train or {})
    for key, value in sections.items():
        spec[key] = value
    return spec


def tiny_spec(*, train: Optional[dict] = None, **sections):
    return parse_spec(copy.deepcopy(tiny_spec_dict(train=train, **sections)), check_model=False)


class HookSink(ListSink):
    """A ListSink that calls `on_step(step, inbox)` after each step row arrives: on CPU
    that is right after the step ran, so a command put there is applied at step + 1."""

    def __init__(self, on_step: Optional[Callable[[int, ControlInbox], None]] = None):
        super().__init__()
        self.on_step = on_step
        self.inbox: Optional[ControlInbox] = None

    def log(self, scope, step, epoch, values):
        super().log(scope, step, epoch, values)
        if scope == STEP and self.on_step is not None:
            self.on_step(step, self.inbox)


def make_trainer(spec, *, on_step=None, scheduled=(), checkpoint_dir=None):
    sink = HookSink(on_step)
    inbox = ControlInbox(scheduled=list(scheduled))
    sink.inbox = inbox
    trainer = Trainer(spec, TrainingContext(sink=sink, inbox=inbox, checkpoint_dir=checkpoint_dir))
    return trainer, sink, inbox


def step_rows(sink: ListSink, keys=("lr", "loss", "acc")) -> dict[int, tuple]:
    return {step: tuple(v[k] for k in keys) for s, step, _, v in sink.rows if s == STEP}


def epoch_rows(sink: ListSink, drop=("epoch_time",)) -> dict[int, dict]:
    return {epoch: {k: x for k, x in v.items() if k not in drop} for s, _, epoch, v in sink.rows if s == EPOCH}
