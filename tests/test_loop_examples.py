"""Every example spec parses, and builds and trains a step with the real loop."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from tests.test_loop_support import one_thread  # noqa: F401
from trainctl.spec import load_spec_file, parse_spec
from trainctl.workers.engine.context import ControlInbox, ListSink, TrainingContext
from trainctl.workers.engine.loop import Cancelled, Trainer
from trainctl.workers.engine.replay import commands_from_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
FAMILIES = {"digits_step", "digits_onecycle", "digits_plateau", "digits_gradual_warmup", "digits_cawb",
            "digits_ema_mixup", "digits_lt_ce", "digits_lt_ldam_drw", "synthetic_bench"}


class StopAfterFirstStep(ListSink):
    def __init__(self, inbox):
        super().__init__()
        self.inbox = inbox

    def log(self, scope, step, epoch, values):
        super().log(scope, step, epoch, values)
        self.inbox.cancel("one step is enough")


def test_there_is_an_example_for_each_family():
    assert FAMILIES <= {p.stem for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses(path):
    spec = parse_spec(load_spec_file(path))
    assert spec.name


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_trains_a_step(path):
    raw = copy.deepcopy(load_spec_file(path))
    # The spec's own epochs (schedules check them), one step each, stopped after step 0.
    raw["train"] = {**raw.get("train", {}), "max_steps_per_epoch": 1, "compile": False, "device": "cpu"}
    raw["model"] = {**raw["model"], "name": "test_resnet"}
    if raw["data"]["dataset"] == "synthetic":
        raw["data"].update(num_samples=512, img_size=32)
    raw["control"] = [{**c, "at_step": 0} for c in raw.get("control", [])]
    spec = parse_spec(raw)
    inbox = ControlInbox(scheduled=commands_from_spec(spec))
    sink = StopAfterFirstStep(inbox)
    with pytest.raises(Cancelled):
        Trainer(spec, TrainingContext(sink=sink, inbox=inbox)).run()
    (step, loss), = sink.series("loss")
    assert step == 0 and math.isfinite(loss)
    assert all(a.ok for a in inbox.acks), inbox.acks
