"""Controls at loop level: applied at the start of the step, acked with the applied step
and old/new values; refusals are acks with ok=False, never a crashed run."""
from __future__ import annotations

import math

import pytest

from tests.test_loop_support import make_trainer, one_thread, tiny_spec  # noqa: F401
from trainctl.workers.engine.context import Command
from trainctl.workers.engine.optim import decaying_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _lrs(sink):
    return dict(sink.series("lr"))


def test_set_lr_and_scale_lr_apply_at_the_start_of_their_step():
    spec = tiny_spec(train={"epochs": 2, "max_steps_per_epoch": 4})
    plain, plain_sink, _ = make_trainer(spec)
    plain.run()
    before = _lrs(plain_sink)
    trainer, sink, inbox = make_trainer(spec, scheduled=[Command("a", "set_lr", 0.02, at_step=5),
                                                         Command("b", "scale_lr", 0.5, at_step=6)])
    trainer.run()
    lrs = _lrs(sink)
    assert all(lrs[s] == before[s] for s in range(5))
    assert lrs[5] == pytest.approx(0.02, rel=1e-12)
    a, b = inbox.acks
    assert (a.command_id, a.ok, a.applied_step) == ("a", True, 5)
    assert a.old_value == pytest.approx(before[5], rel=1e-12) and a.new_value == 0.02
    assert (b.applied_step, b.old_value, b.new_value) == (6, pytest.approx(lrs[6] * 2), pytest.approx(lrs[6]))
    # The schedule keeps its shape: every later LR is the original times the same factor.
    factor = lrs[7] / before[7]
    assert factor == pytest.approx(0.02 / before[5] * 0.5, rel=1e-9)
    # The optimizer really trained with it.
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(lrs[7])


def test_set_lr_decay_on_a_schedule_with_a_decay_factor_and_refused_without_one():
    spec = tiny_spec(train={"epochs": 3, "max_steps_per_epoch": 2},
                     schedule={"name": "step", "step_size": 1, "gamma": 0.5})
    trainer, sink, inbox = make_trainer(spec, scheduled=[Command("g", "set_lr_decay", 0.1, at_step=3)])
    trainer.run()
    (ack,) = inbox.acks
    assert (ack.ok, ack.applied_step, ack.old_value, ack.new_value) == (True, 3, 0.5, 0.1)
    lrs = _lrs(sink)
    assert lrs[3] == pytest.approx(0.025) and lrs[4] == pytest.approx(0.0025)   # decay at epoch 2 uses 0.1

    trainer, _, inbox = make_trainer(tiny_spec(schedule={"name": "constant"}),
                                     scheduled=[Command("g", "set_lr_decay", 0.1, at_step=1)])
    trainer.run()
    (ack,) = inbox.acks
    assert not ack.ok and ack.applied_step == 1 and "step" in ack.message


def test_set_weight_decay_changes_only_the_decaying_group():
    trainer, _, inbox = make_trainer(tiny_spec(), scheduled=[Command("w", "set_weight_decay", 0.02, at_step=2)])
    trainer.run()
    (ack,) = inbox.acks
    assert (ack.ok, ack.applied_step, ack.old_value, ack.new_value) == (True, 2, 1e-4, 0.02)
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in decaying_groups(trainer.optimizer)] == [0.02]
    assert [g["weight_decay"] for g in groups if not g.get("decays")] == [0.0]


def test_set_ema_decay_with_and_without_ema():
    spec = tiny_spec(train={"ema": {"decay": 0.9}})
    trainer, sink, inbox = make_trainer(spec, scheduled=[Command("e", "set_ema_decay", 0.99, at_step=3)])
    trainer.run()
    (ack,) = inbox.acks
    assert (ack.ok, ack.applied_step, ack.old_value, ack.new_value) == (True, 3, 0.9, 0.99)
    assert trainer.ema.target_decay(7) == 0.99

    trainer, sink, inbox = make_trainer(tiny_spec(), scheduled=[Command("e", "set_ema_decay", 0.99, at_step=3)])
    summary = trainer.run()
    (ack,) = inbox.acks
    assert not ack.ok and ack.applied_step == 3 and "train.ema" in ack.message
    assert summary.steps == 8


@pytest.mark.parametrize("verb,value,fragment", [
    ("set_lr", -1.0, "set_lr must be"),
    ("set_lr", math.nan, "finite"),
    ("set_ema_decay", 1.5, "(0, 1]"),
    ("warp_speed", 1.0, "unknown command"),
])
def test_invalid_commands_are_refused_and_the_run_goes_on(verb, value, fragment):
    trainer, sink, inbox = make_trainer(tiny_spec(train={"epochs": 1, "max_steps_per_epoch": 3}))
    inbox.put(Command("bad", verb, value))
    inbox.put(Command("good", "set_lr", 0.01))
    trainer.run()
    bad, good = inbox.acks
    assert not bad.ok and fragment in bad.message and bad.applied_step == 0
    assert good.ok and dict(sink.series("lr"))[0] == 0.01


# ---------------------------------------------------------------- issue 11 items 1, 2


def test_ack_says_what_an_lr_command_means_ahead_and_the_run_does_it():
    """set_lr inside the warmup: the ack's consequence names the new peak and the final
    LR, and the LRs the run then trains with are those."""
    import re

    spec = tiny_spec(train={"epochs": 3, "max_steps_per_epoch": 4})  # warmup: steps 0-3
    trainer, sink, inbox = make_trainer(spec, scheduled=[Command("a", "set_lr", 0.02, at_step=1)])
    trainer.run()
    (ack,) = inbox.acks
    m = re.fullmatch(r"warmup continues: peak (\S+) at step (\d+), final (\S+) at step 11", ack.consequence)
    assert m, ack.consequence
    lrs = _lrs(sink)
    peak_step = int(m.group(2))
    assert max(lrs[s] for s in range(1, 12)) == lrs[peak_step]
    assert float(m.group(1)) == pytest.approx(lrs[peak_step], rel=5e-3)
    assert float(m.group(3)) == pytest.approx(lrs[11], rel=5e-3)


def test_hold_pins_the_trained_lr_and_survives_a_resume(tmp_path):
    spec = tiny_spec(train={"epochs": 3, "max_steps_per_epoch": 4})
    held = [Command("h", "set_lr", 0.01, at_step=2, hold=True)]
    trainer, sink, inbox = make_trainer(spec, scheduled=held, checkpoint_dir=str(tmp_path))
    trainer.run()
    (ack,) = inbox.acks
    assert ack.ok and ack.consequence.startswith("LR held at 0.01 from step 2")
    lrs = _lrs(sink)
    assert [lrs[s] for s in range(2, 12)] == [0.01] * 10
    assert trainer.optimizer.param_groups[1]["lr"] == 0.01
    # a new Trainer resumed from the last checkpoint keeps the hold (schedule state)
    again, _, _ = make_trainer(spec, checkpoint_dir=str(tmp_path))
    again._maybe_resume()
    assert again.schedule.lr_at(11) == 0.01 and again.schedule.held(11) == (2, 0.01)


def test_worker_refuses_a_decay_that_cannot_act():
    spec = tiny_spec(train={"epochs": 3, "max_steps_per_epoch": 2},
                     schedule={"name": "step", "step_size": 1, "gamma": 0.5})
    trainer, sink, inbox = make_trainer(spec, scheduled=[Command("late", "set_lr_decay", 0.1, at_step=4),
                                                         Command("hold", "set_ema_decay", 0.9, at_step=4,
                                                                 hold=True)])
    trainer.run()
    late, hold = inbox.acks
    assert not late.ok and "no gamma decay happens after step 4" in late.message
    assert not hold.ok and "hold applies to set_lr and scale_lr only" in hold.message
