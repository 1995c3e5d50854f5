"""One control vocabulary: every spelling of a verb (wire kind, stored name, spec/engine
verb, CLI command) is derived from the proto's ControlKind by trainctl.controls, and the
store's name tuples from the proto enums. In-process, fast."""
from __future__ import annotations

import pytest

from trainctl import controls
from trainctl.schedules import REGISTRY, apply_control, build_schedule, parse_schedule, preview
from trainctl.schedules.registry import decay_param_of
from trainctl.spec import ControlEntry, parse_spec
from trainctl.v1 import trainctl_pb2 as pb


def test_every_proto_kind_has_every_spelling():
    kinds = {n: v for n, v in pb.ControlKind.items() if v}
    assert controls.KIND_NAMES == tuple(kinds)
    for name, number in kinds.items():
        v = controls.BY_KIND[number]
        assert (v.name, v.verb, v.cli) == (name, name.lower(), name.lower().replace("_", "-"))
        for spelling in (v.name, v.verb, v.cli):
            assert controls.kind_of(spelling) == number
        assert controls.verb_of(number) == v.verb
    assert controls.verb_of(0) is None and controls.verb_of(999) is None and controls.kind_of("nope") is None
    assert controls.KNOB_VERB == "set_knob" and "set_knob" not in controls.SPEC_VERBS
    assert controls.HOLD_VERBS == ("set_lr", "scale_lr")
    assert controls.SCHEDULE_VERBS == ("set_lr", "scale_lr", "set_lr_decay")


def test_the_spec_schedules_exactly_the_spec_verbs():
    assert [f for f in ControlEntry.model_fields if f != "at_step"] == list(controls.SPEC_VERBS)
    for verb in controls.SPEC_VERBS:
        assert ControlEntry(at_step=1, **{verb: 0.5}).verb == verb
    with pytest.raises(ValueError, match="set_knob"):  # a knob is named by a run, not a spec
        ControlEntry(at_step=1, set_knob=0.5)


def test_store_name_tuples_are_the_proto_enums():
    from trainctl.server.store import entities as e

    def names(enum):
        return tuple(n for n, v in enum.items() if v)

    assert e.STATES == names(pb.ExperimentState)
    assert e.SCOPES == names(pb.Scope)
    assert e.CONTROL_KINDS == names(pb.ControlKind)
    assert e.CONTROL_STATUSES == names(pb.ControlStatus)
    assert e.CONTROL_SOURCES == names(pb.ControlSource)
    assert e.EXPERIMENT_KINDS == names(pb.ExperimentKind)


def test_hold_is_refused_the_same_way_everywhere():
    sched = build_schedule({"name": "step", "step_size": 1}, base_lr=0.1, steps_per_epoch=2, epochs=3)
    with pytest.raises(ValueError, match="hold applies to set_lr and scale_lr only, not set_lr_decay"):
        apply_control(sched, 0, "set_lr_decay", 0.5, hold=True)
    with pytest.raises(ValueError, match="hold applies to set_lr and scale_lr only"):
        controls.check_hold("set_weight_decay", True)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_decay_factor_is_read_from_the_registry_as_a_built_schedule_has_it(name):
    # The server answers "has this schedule a decay factor" without building one; the
    # answer must be the one the run's schedule gives, for every schedule and for
    # gradual_warmup around each of them.
    required = {"cosine_restarts": {"T_0": 2}, "exponential": {"gamma": 0.9}, "multistep": {"milestones": [1]},
                "step": {"step_size": 1}, "gradual_warmup": {"total_epoch": 1}}
    params = [{"name": name, **required.get(name, {})}]
    if name != "gradual_warmup":
        params.append({"name": "gradual_warmup", "total_epoch": 1, "after": params[0]})
    for p in params:
        parsed = parse_schedule(p)
        built = build_schedule(parsed, base_lr=0.1, steps_per_epoch=2, epochs=4)
        assert decay_param_of(parsed) == built.decay_param, p


def test_the_loop_and_preview_apply_commands_alike():
    # engine/control.py (the loop) and schedules.preview reach the schedule through the
    # same apply_control: the LR after a command is the same from both.
    torch = pytest.importorskip("torch")
    from trainctl.workers.engine.context import Command
    from trainctl.workers.engine.control import ControlTargets, apply_command

    p = {"name": "cosine"}
    cmds = [(3, "scale_lr", 0.5, False), (5, "set_lr", 0.02, True), (7, "set_lr", 0.03, False)]
    expected = preview(p, base_lr=0.1, steps_per_epoch=4, epochs=3, controls=cmds)
    sched = build_schedule(p, base_lr=0.1, steps_per_epoch=4, epochs=3)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    got = []
    for s in range(12):
        for at, verb, value, hold in cmds:
            if at == s:
                assert apply_command(Command(f"c{s}", verb, value, hold=hold), s, ControlTargets(sched, opt)).ok
        got.append(sched.lr_at(s))
        if (s + 1) % 4 == 0:
            sched.on_epoch_end(s // 4, {})
    assert got == expected


def test_spec_controls_round_trip_through_the_vocabulary():
    spec = parse_spec({"name": "x", "model": {"name": "resnet10t"}, "data": {"dataset": "digits"},
                       "control": [{"at_step": 2, "set_weight_decay": 0.0}]}, check_model=False)
    entry = spec.control[0]
    assert (entry.verb, entry.value) == ("set_weight_decay", 0.0)
    assert controls.kind_of(entry.verb) == pb.SET_WEIGHT_DECAY
