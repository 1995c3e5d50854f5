"""Live controls, persistence and validation, for every registered schedule."""
import json
import math

import pytest
from pydantic import ValidationError

from trainctl.schedules import (
    REGISTRY,
    DecayCannotAct,
    NoDecayFactor,
    ScheduleParams,
    build_schedule,
    decay_schedules,
    preview,
)

SPE, EPOCHS, BASE = 5, 12, 0.2
N = SPE * EPOCHS

# One or more representative configs per schedule; all have a warmup so controls can be
# exercised inside it.
EXAMPLES = {
    "constant": [{"warmup_epochs": 2, "warmup_lr": 0.01}],
    "step": [{"step_size": 3, "gamma": 0.5, "warmup_epochs": 1.5, "warmup_lr": 0.01}],
    "multistep": [{"milestones": [2, 5, 8], "gamma": 0.3, "warmup_epochs": 1, "warmup_lr": 0.02, "per_step": False}],
    "cosine": [
        {"warmup_epochs": 2, "warmup_lr": 1e-3, "min_lr": 1e-3},
        {"t_initial": 3, "cycle_limit": 4, "cycle_decay": 0.7, "warmup_epochs": 1, "warmup_lr": 0.01, "noise_range_t": 5},
    ],
    "tanh": [{"t_initial": 4, "cycle_limit": 3, "cycle_decay": 0.6, "warmup_epochs": 1, "warmup_lr": 0.01}],
    "poly": [{"t_initial": 4, "cycle_limit": 3, "cycle_decay": 0.6, "power": 2, "warmup_epochs": 1, "warmup_lr": 0.01}],
    "exponential": [
        {"gamma": 0.8, "warmup_epochs": 2, "warmup_lr": 0.01},
        {"gamma": 0.8, "warmup_epochs": 2, "warmup_lr": 0.01, "per_step": False, "warmup_prefix": True},
    ],
    "linear": [{"start_factor": 0.2, "end_factor": 0.9, "total_iters": 6, "warmup_epochs": 1.6, "warmup_lr": 0.01}],
    "cosine_restarts": [{"T_0": 2, "T_mult": 2, "eta_min": 1e-3, "warmup_epochs": 1.6, "warmup_lr": 0.01}],
    "onecycle": [{"pct_start": 0.3}, {"three_phase": True, "anneal_strategy": "linear", "per_step": False}],
    "plateau": [
        {"patience": 1, "factor": 0.5, "warmup_epochs": 1.6, "warmup_lr": 0.01, "min_lr": 0.01},
        {"patience": 0, "factor": 0.5, "cooldown": 1, "per_step": False, "warmup_epochs": 2, "warmup_lr": 0.01},
    ],
    "gradual_warmup": [
        {"multiplier": 2, "total_epoch": 2, "after": {"name": "step", "step_size": 2, "gamma": 0.5}},
        {"multiplier": 1, "total_epoch": 1.6, "after": {"name": "plateau", "patience": 1, "factor": 0.5}},
        {"multiplier": 3, "total_epoch": 2, "per_step": False, "after": {"name": "cosine", "min_lr": 1e-3}},
        {"multiplier": 1.5, "total_epoch": 2, "after": {"name": "linear", "start_factor": 0.5}},
    ],
    "cawb": [
        {"steps": [4, 8], "step_scale": 0.5, "warmup_epoch": 1.6, "eta_min": 0.05},
        {"steps": [5, 3], "warmup_epoch": 2, "per_step": False},
    ],
}

CASES = [(name, dict(cfg, name=name)) for name, cfgs in EXAMPLES.items() for cfg in cfgs]
IDS = [f"{n}{i}" for i, (n, _) in enumerate(CASES)]


def build(cfg):
    return build_schedule(cfg, base_lr=BASE, steps_per_epoch=SPE, epochs=EPOCHS)


def drive(sched, controls=(), start=0, stop=N, metrics=lambda e: {"val_loss": 1.0}):
    """Run like the loop does; returns the LR of each step in [start, stop)."""
    due = {}
    for at, kind, value, *hold in controls:
        due.setdefault(at, []).append((kind, value, hold))
    out = []
    for s in range(start, stop):
        for kind, value, hold in due.get(s, ()):
            {"set_lr": sched.set_lr, "scale_lr": sched.scale_lr, "set_lr_decay": sched.set_decay}[kind](s, value, *hold)
        out.append(sched.lr_at(s))
        if (s + 1) % SPE == 0:
            sched.on_epoch_end(s // SPE, metrics(s // SPE))
    return out


def test_every_schedule_has_examples():
    assert set(EXAMPLES) == set(REGISTRY)


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
@pytest.mark.parametrize("at", [3, 7, 23, 41])  # 3 and 7 lie inside the warmups
@pytest.mark.parametrize("kind", ["set_lr", "scale_lr"])
def test_set_and_scale_lr_keep_shape(name, cfg, at, kind):
    orig = drive(build(cfg))
    sched = build(cfg)
    before = drive(sched, stop=at)
    value = 0.0123 if kind == "set_lr" else 0.37
    old, new = (sched.set_lr if kind == "set_lr" else sched.scale_lr)(at, value)
    want = value if kind == "set_lr" else orig[at] * value
    assert old == orig[at]
    assert new == want and sched.lr_at(at) == want  # exact, not approximately
    after = drive(sched, start=at)
    assert before == orig[:at]
    factor = want / orig[at]
    for s, v in enumerate(after, start=at):
        assert v == pytest.approx(orig[s] * factor, rel=1e-12, abs=1e-300), s
    # preview applies the same control the same way
    assert preview(cfg, base_lr=BASE, steps_per_epoch=SPE, epochs=EPOCHS, controls=[(at, kind, value)]) == before + after


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
def test_set_lr_twice_and_scale_compose(name, cfg):
    orig = drive(build(cfg))
    sched = build(cfg)
    got = drive(sched, [(10, "set_lr", 0.05), (30, "scale_lr", 2.0)])
    assert got[10] == 0.05
    assert got[30] == pytest.approx(2 * got[29] * orig[30] / orig[29], rel=1e-12)
    for s in range(31, N):
        assert got[s] == pytest.approx(orig[s] * got[30] / orig[30], rel=1e-12)


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_bad_lr_values_rejected(name, cfg, bad):
    sched = build(cfg)
    with pytest.raises(ValueError, match="finite number > 0"):
        sched.set_lr(12, bad)
    with pytest.raises(ValueError, match="finite number > 0"):
        sched.scale_lr(12, bad)


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
def test_decay_or_no_decay(name, cfg):
    sched = build(cfg)
    if sched.decay_param is None:
        with pytest.raises(NoDecayFactor) as e:
            sched.set_decay(10, 0.5)
        for other in decay_schedules():
            assert other in str(e.value)
        assert isinstance(e.value, ValueError)
        return
    orig = drive(build(cfg))
    at = 17
    drive(sched, stop=at)
    if sched.decay_ahead(at):  # no decay after step 17 (a single cosine cycle): refused, nothing changes
        with pytest.raises(DecayCannotAct):
            sched.set_decay(at, 0.25)
        assert drive(sched, start=at) == orig[at:]
        return
    sched = build(cfg)
    got = drive(sched, [(at, "set_lr_decay", 0.25)])
    assert got[: at + 1] == orig[: at + 1]  # continuous at the step, unchanged before
    assert sched.decay == 0.25
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match=sched.decay_param):
            sched.set_decay(at, bad)


def _forced_decay_changes_lr(cfg, at, gamma, metrics):
    """Apply set_decay at `at` with the refusal switched off: does any later LR change?"""
    orig = drive(build(cfg), metrics=metrics)
    b = build(cfg)
    drive(b, stop=at, metrics=metrics)
    b.decay_ahead = lambda step: ""
    b.set_decay(at, gamma)
    after = drive(b, start=at, metrics=metrics)
    return any(abs(x - y) > 1e-12 * abs(y) for x, y in zip(after, orig[at:]))


@pytest.mark.parametrize("name,cfg", [c for c in CASES if REGISTRY[c[0]].decay_param or c[0] == "gradual_warmup"],
                         ids=[i for i, c in zip(IDS, CASES) if REGISTRY[c[0]].decay_param or c[0] == "gradual_warmup"])
def test_set_decay_is_refused_exactly_when_no_decay_can_act(name, cfg):
    """Issue 11 item 2: refused (DecayCannotAct, the server's FAILED_PRECONDITION)
    if and only if no factor would change any later LR."""
    metrics = lambda e: {"val_loss": 1.0}  # noqa: E731  (plateau: a stall every epoch)
    refused = acted = 0
    for at in (0, 3, 7, 17, 23, 41, 50, 55, N - 2, N - 1):
        a = build(cfg)
        drive(a, stop=at, metrics=metrics)
        if not a.decay_param:
            continue
        why = a.decay_ahead(at)
        changes = any(_forced_decay_changes_lr(cfg, at, g, metrics) for g in (0.99, 0.01))
        assert bool(why) == (not changes), (at, why)
        if why:
            refused += 1
            with pytest.raises(DecayCannotAct, match=why[:20]):
                a.set_decay(at, 0.5)
        else:
            acted += 1
    assert refused >= 1 or not acted  # the last step at least, when the schedule has a factor


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
def test_state_dict_roundtrip(name, cfg):
    controls = [(8, "scale_lr", 0.5), (21, "set_lr", 0.07)]
    probe = build(cfg)
    drive(probe, controls, stop=26)
    if REGISTRY[name].decay_param and not probe.decay_ahead(26):
        controls.append((26, "set_lr_decay", 0.4))
    metrics = lambda e: {"val_loss": 1.0 / (1 + e % 3)}  # noqa: E731
    ref = drive(build(cfg), controls, metrics=metrics)
    a = build(cfg)
    first = drive(a, controls, stop=30, metrics=metrics)
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints may store it as JSON
    b = build(cfg)
    b.load_state_dict(state)
    rest = drive(b, [c for c in controls if c[0] >= 30], start=30, metrics=metrics)
    assert first + rest == ref


def test_load_state_of_other_schedule_rejected():
    a = build(dict(CASES[0][1]))
    b = build({"name": "step", "step_size": 2})
    with pytest.raises(ValueError, match="not 'step'"):
        b.load_state_dict(a.state_dict())


# -- hand-computed decay-factor changes --------------------------------------------------


def test_step_set_decay_by_hand():
    s = build_schedule({"name": "step", "step_size": 2, "gamma": 0.5}, base_lr=1.0, steps_per_epoch=4, epochs=10)
    got = drive(s, [(13, "set_lr_decay", 0.1)], stop=40)  # epoch 3.25: one decay done (at epoch 2)
    want = [0.5 ** min(s // 8, 1) * 0.1 ** max(s // 8 - 1, 0) for s in range(40)]
    assert got == pytest.approx(want, rel=1e-12)


def test_step_set_decay_exactly_at_a_decay():
    s = build_schedule({"name": "step", "step_size": 1, "gamma": 0.5}, base_lr=1.0, steps_per_epoch=1, epochs=5)
    got = drive(s, [(2, "set_lr_decay", 0.1)], stop=5)
    assert got == pytest.approx([1, 0.5, 0.25, 0.025, 0.0025], rel=1e-12)


def test_multistep_set_decay_twice_by_hand():
    s = build_schedule(
        {"name": "multistep", "milestones": [2, 4, 6, 8], "gamma": 0.5}, base_lr=1.0, steps_per_epoch=2, epochs=10
    )
    got = drive(s, [(5, "set_lr_decay", 0.2), (13, "set_lr_decay", 0.9)], stop=20)
    per_epoch = [1, 1, 0.5, 0.5, 0.1, 0.1, 0.1 * 0.2, 0.1 * 0.2, 0.1 * 0.2 * 0.9, 0.1 * 0.2 * 0.9]
    assert got == pytest.approx([per_epoch[i // 2] for i in range(20)], rel=1e-12)


def test_cosine_set_decay_by_hand():
    s = build_schedule(
        {"name": "cosine", "t_initial": 2, "cycle_limit": 4, "cycle_decay": 0.5, "per_step": False},
        base_lr=1.0,
        steps_per_epoch=1,
        epochs=8,
    )
    got = drive(s, [(3, "set_lr_decay", 0.1)], stop=8)
    peaks = [1, 0.5, 0.05, 0.005]
    want = [peaks[e // 2] * (1 if e % 2 == 0 else 0.5) for e in range(8)]
    assert got == pytest.approx(want, rel=1e-12)


def test_set_decay_at_step_zero_replaces_gamma():
    s = build_schedule({"name": "step", "step_size": 1, "gamma": 0.5}, base_lr=1.0, steps_per_epoch=1, epochs=4)
    assert s.set_decay(0, 0.1) == (0.5, 0.1)
    assert drive(s, stop=4) == pytest.approx([1, 0.1, 0.01, 0.001], rel=1e-12)
    assert s.state_dict()["decay_history"] == [[0.0, 0.1]]


def test_set_lr_at_zero_lr_is_an_error():
    s = build_schedule({"name": "constant", "warmup_epochs": 1}, base_lr=1.0, steps_per_epoch=4, epochs=2)
    with pytest.raises(ValueError, match="LR is 0 at step 0"):
        s.set_lr(0, 0.5)


# -- validation --------------------------------------------------------------------------

BAD = [
    ({"name": "step", "step_size": 0}, "step.step_size"),
    ({"name": "step", "step_size": 2, "gamma": 1.5}, "step.gamma"),
    ({"name": "step", "step_size": 2, "bogus": 1}, "step.bogus"),
    ({"name": "multistep", "milestones": [1, -2]}, "multistep.milestones.1"),
    ({"name": "multistep", "milestones": []}, "multistep.milestones"),
    ({"name": "cosine", "warmup_epochs": -1}, "cosine.warmup_epochs"),
    ({"name": "cosine", "warmup_lr": -1}, "cosine.warmup_lr"),
    ({"name": "cosine", "cycle_limit": 0}, "cosine.cycle_limit"),
    ({"name": "cosine", "t_initial": 0}, "cosine.t_initial"),
    ({"name": "tanh", "lb": 3, "ub": 1}, "lb must be < ub"),
    ({"name": "poly", "power": 0}, "poly.power"),
    ({"name": "nope"}, "nope"),
    ({"name": "exponential"}, "exponential.gamma"),
    ({"name": "linear", "start_factor": 0}, "linear.start_factor"),
    ({"name": "cosine_restarts", "T_0": 2, "T_mult": 0}, "cosine_restarts.T_mult"),
    ({"name": "onecycle", "pct_start": 1.0}, "onecycle.pct_start"),
    ({"name": "onecycle", "anneal_strategy": "exp"}, "onecycle.anneal_strategy"),
    ({"name": "plateau", "factor": 1.0}, "plateau.factor"),
    ({"name": "plateau", "mode": "avg"}, "plateau.mode"),
    ({"name": "gradual_warmup", "total_epoch": 2, "multiplier": 0.5}, "gradual_warmup.multiplier"),
    ({"name": "gradual_warmup", "total_epoch": 2, "after": {"name": "step", "step_size": -1}},
     "gradual_warmup.after.step.step_size"),
    ({"name": "gradual_warmup", "total_epoch": 2, "after": {"name": "gradual_warmup", "total_epoch": 1}},
     "gradual_warmup.after"),
    ({"name": "gradual_warmup", "total_epoch": 2, "warmup_epochs": 1}, "use total_epoch"),
    ({"name": "cawb", "steps": [3, -1]}, "cawb.steps.1"),
    ({"name": "cawb", "eta_min": 2}, "cawb.eta_min"),
    ({"name": "cawb", "warmup_epochs": 1}, "warmup_epoch"),
]


@pytest.mark.parametrize("spec,where", BAD, ids=[w for _, w in BAD])
def test_invalid_params_rejected_with_path(spec, where):
    from pydantic import TypeAdapter

    with pytest.raises(ValidationError) as e:
        TypeAdapter(ScheduleParams).validate_python(spec)
    assert where in str(e.value)
    with pytest.raises(ValidationError):
        build(spec)


# -- hold (issue 11 item 1: `set-lr --hold`) ----------------------------------------------


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
@pytest.mark.parametrize("kind", ["set_lr", "scale_lr"])
def test_hold_pins_the_lr_then_a_plain_set_lr_gives_the_shape_back(name, cfg, kind):
    orig = drive(build(cfg))
    sched = build(cfg)
    value = 0.0123 if kind == "set_lr" else 0.37
    got = drive(sched, [(7, kind, value, True), (40, "set_lr", 0.05)])
    pinned = value if kind == "set_lr" else orig[7] * value
    assert got[:7] == orig[:7]
    assert got[7:40] == [pinned] * 33  # exactly the value, every step, warmup or not
    assert got[40] == 0.05  # released: the schedule's shape again, scaled to 0.05 at step 40
    for s in range(41, N):
        assert got[s] == pytest.approx(orig[s] * 0.05 / orig[40], rel=1e-12)


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
def test_hold_survives_a_checkpoint_and_refuses_decays(name, cfg):
    controls = [(9, "set_lr", 0.03, True)]
    ref = drive(build(cfg), controls)
    a = build(cfg)
    first = drive(a, controls, stop=20)
    b = build(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert first + drive(b, start=20) == ref
    assert ref[9:] == [0.03] * (N - 9)
    if b.decay_param:
        with pytest.raises(DecayCannotAct, match="held at 0.03"):
            b.set_decay(25, 0.5)


def test_old_checkpoint_state_without_hold_loads():
    a = build(dict(EXAMPLES["step"][0], name="step"))
    state = a.state_dict()
    del state["hold"]
    b = build(dict(EXAMPLES["step"][0], name="step"))
    b.load_state_dict(state)
    assert b.held(30) is None


# -- the consequence (issue 11 item 1: the ack says what a command means ahead) --------------


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
@pytest.mark.parametrize("at", [3, 23])
def test_consequence_names_the_peak_and_final_lr_the_run_then_has(name, cfg, at):
    import re

    from trainctl.schedules import consequence

    metrics = lambda e: {"val_loss": 1.0}  # noqa: E731
    sched = build(cfg)
    drive(sched, stop=at, metrics=metrics)
    sched.set_lr(at, 0.0123)
    words = consequence(sched, at, "set_lr")
    rest = drive(sched, start=at, metrics=metrics)  # what the run then does (plateau: with these metrics)
    if "plateau" in words:
        assert words.startswith("plateau continues from 0.0123")
        return
    m = re.search(r"final (\S+) at step (\d+)$", words)
    assert m and int(m.group(2)) == N - 1, words
    assert float(m.group(1)) == pytest.approx(rest[-1], rel=5e-3)
    peak = re.search(r"(?:peak|rises to) (\S+) at step (\d+)", words)
    if peak:
        k = int(peak.group(2))
        assert rest[k - at] == max(rest) and float(peak.group(1)) == pytest.approx(max(rest), rel=5e-3)
    else:
        assert max(rest) <= 0.0123 * (1 + 1e-9), words
    assert words.startswith("warmup continues" if sched.in_warmup(at) else f"{name} continues from 0.0123")


def test_consequence_of_hold_and_decay():
    from trainctl.schedules import consequence

    s = build_schedule({"name": "step", "step_size": 4, "gamma": 0.5}, base_lr=0.1, steps_per_epoch=10, epochs=12)
    s.set_decay(5, 0.1)
    assert consequence(s, 5, "set_lr_decay") == \
        "step continues from 0.1: next decay at step 40: 0.1 -> 0.01, final 0.001 at step 119"
    s.set_lr(50, 0.02, hold=True)
    assert consequence(s, 50, "set_lr") == ("LR held at 0.02 from step 50 to the end (step 119); "
                                            "a set_lr/scale_lr without --hold gives the schedule back")
    assert consequence(s, 50, "set_ema_decay") == ""
