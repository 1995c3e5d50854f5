"""Replay at loop level: a run's control log, turned into scheduled commands, re-runs to
the same loss curve bit-for-bit (CPU, deterministic)."""
from __future__ import annotations

import pytest

from tests.test_loop_support import epoch_rows, make_trainer, one_thread, step_rows, tiny_spec  # noqa: F401
from trainctl.workers.engine.context import Ack, Command
from trainctl.workers.engine.replay import ControlRecord, commands_from_log, commands_from_spec, control_log

pytestmark = pytest.mark.usefixtures("one_thread")


def test_replayed_control_log_reproduces_the_loss_curve():
    spec = tiny_spec(train={"epochs": 3, "max_steps_per_epoch": 4, "ema": {"decay": 0.9}},
                     schedule={"name": "step", "step_size": 1, "gamma": 0.5},
                     control=[{"at_step": 2, "set_lr_decay": 0.8}])
    live = {1: Command("a", "scale_lr", 0.5), 4: Command("b", "set_weight_decay", 0.05),
            6: Command("c", "set_ema_decay", 0.99), 7: Command("d", "set_lr", 0.02),
            8: Command("e", "set_lr", 0.03), 9: Command("f", "set_ema_decay", 2.0)}   # f is refused
    sent = []

    def on_step(step, inbox):
        if step in live:
            sent.append(live[step])
            inbox.put(live[step])
        if step == 7:                      # two commands due at the same step keep their order
            sent.append(Command("g", "scale_lr", 2.0))
            inbox.put(sent[-1])

    scheduled = commands_from_spec(spec)
    original, orig_sink, orig_inbox = make_trainer(spec, on_step=on_step, scheduled=scheduled)
    original.run()
    log = control_log([*scheduled, *sent], orig_inbox.acks)
    assert [r.ok for r in log].count(False) == 1

    replayed, rep_sink, rep_inbox = make_trainer(spec, scheduled=commands_from_log(log))
    replayed.run()
    assert step_rows(rep_sink) == step_rows(orig_sink)
    assert epoch_rows(rep_sink) == epoch_rows(orig_sink)
    ok = [(a.command_id, a.applied_step, a.old_value, a.new_value) for a in orig_inbox.acks if a.ok]
    assert [(a.command_id, a.applied_step, a.old_value, a.new_value) for a in rep_inbox.acks] == ok
    # And the controls did change the run: without them the curve differs.
    plain, plain_sink, _ = make_trainer(spec)
    plain.run()
    assert step_rows(plain_sink) != step_rows(orig_sink)


def test_commands_from_log_accepts_records_dicts_and_statuses():
    records = [
        ControlRecord("x", "set_lr", 0.1, True, 5),
        {"command_id": "y", "verb": "scale_lr", "value": 2, "status": "APPLIED", "applied_step": 3},
        {"command_id": "z", "verb": "set_lr", "value": 1, "status": "FAILED", "applied_step": 3},
        ControlRecord("p", "set_lr", 0.1, True, None),          # never applied
        ControlRecord("q", "set_lr_decay", 0.5, False, 4),      # refused
        {"command_id": "w", "verb": "set_lr", "value": 0.2, "ok": True, "applied_step": 3},
    ]
    cmds = commands_from_log(records)
    assert [(c.command_id, c.at_step, c.value) for c in cmds] == [("y", 3, 2.0), ("w", 3, 0.2), ("x", 5, 0.1)]


def test_control_log_joins_commands_and_acks():
    cmds = [Command("a", "set_lr", 0.1), Command("b", "scale_lr", 2.0)]
    acks = [Ack("b", True, 7, 0.1, 0.2)]
    assert control_log(cmds, acks) == [ControlRecord("b", "scale_lr", 2.0, True, 7, 0.1, 0.2)]


def test_spec_controls_become_scheduled_commands_in_spec_order():
    spec = tiny_spec(control=[{"at_step": 3, "set_lr": 0.1}, {"at_step": 1, "scale_lr": 0.5}])
    assert [(c.verb, c.at_step) for c in commands_from_spec(spec)] == [("set_lr", 3), ("scale_lr", 1)]
