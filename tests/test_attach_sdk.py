"""The attach SDK in-process (fast): the multiplier rule for every scheduler class against
an unsteered copy, groups' ratios, decay factors, knobs, the loop-side row logic and
state_dict. Real-process tests (server, example scripts, CLI steering, outages) are in
tests/test_attach_e2e.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from trainctl.attach.run import Run
from trainctl.attach.steer import Steering
from trainctl.v1 import trainctl_pb2 as pb

S = torch.optim.lr_scheduler


def _opt():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    # Two groups with different LR and weight decay: ratios between them must be kept.
    return torch.optim.SGD([{"params": [a], "lr": 0.1, "weight_decay": 1e-4},
                            {"params": [b], "lr": 0.02, "weight_decay": 0.0}], lr=0.1, momentum=0.9)


SCHEDULERS = {
    "StepLR": lambda o: S.StepLR(o, step_size=7, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[10, 25], gamma=0.3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.95),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=20),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=8, T_mult=2),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda s: 0.97),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.1, total_iters=10),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=30, power=2.0),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=[1.0, 0.2], total_steps=41),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=[0.01, 0.002], max_lr=[0.1, 0.02], step_size_up=5),
    "SequentialLR": lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=0.1, total_iters=5),
                                                 S.ExponentialLR(o, gamma=0.9)], milestones=[5]),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ConstantLR(o, factor=0.5, total_iters=4),
                                                      S.ExponentialLR(o, gamma=0.9)]),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=2),
}
# Plateau metric: improves, then stalls so the factor applies several times.
METRIC = [1.0 / (1 + i) if i < 8 else 0.2 for i in range(40)]


def _sched_step(sched, i):
    if isinstance(sched, S.ReduceLROnPlateau):
        sched.step(METRIC[i])
    else:
        sched.step()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedule_keeps_its_shape_times_one_constant(name):
    """At every step, steered LR of every group = unsteered copy's LR x the multiplier,
    where the multiplier changes only at the steps commands are applied."""
    make = SCHEDULERS[name]
    opt, ref_opt = _opt(), _opt()
    sched, ref = make(opt), make(ref_opt)
    st = Steering()
    st.attach(opt, sched)
    commands = {6: (pb.SET_LR, 0.05), 15: (pb.SCALE_LR, 3.0), 27: (pb.SCALE_LR, 0.1)}
    mult = 1.0
    for i in range(40):
        if i in commands:
            kind, value = commands[i]
            before = opt.param_groups[0]["lr"]
            out = st.apply(kind, value)
            if ref_opt.param_groups[0]["lr"] == 0:  # CyclicLR etc. never 0 here; keep the rule honest
                assert not out.ok
                continue
            assert out.ok, out.message
            assert out.old == pytest.approx(before)
            target = value if kind == pb.SET_LR else before * value
            assert opt.param_groups[0]["lr"] == pytest.approx(target, rel=1e-12)
            mult = target / ref_opt.param_groups[0]["lr"]
        for g, rg in zip(opt.param_groups, ref_opt.param_groups):
            assert g["lr"] == pytest.approx(rg["lr"] * mult, rel=1e-12, abs=1e-15), (name, i)
        opt.step()
        ref_opt.step()
        _sched_step(sched, i)
        _sched_step(ref, i)
    # The scheduler's own state stays that of the unsteered copy (picklable, comparable).
    sd, rsd = sched.state_dict(), ref.state_dict()
    assert set(sd) == set(rsd)
    torch.save(sd, __import__("io").BytesIO())
    assert type(sched).__name__ == name and isinstance(sched, type(ref))


def test_the_multiplier_rule_fails_without_the_sdk_wrapping():
    """Guard for the test above: writing the LR straight into the groups (what the SDK
    must not do) breaks the rule for ReduceLROnPlateau's min_lr clamp, so the
    comparison above can fail."""
    opt2 = _opt()
    s2 = S.ReduceLROnPlateau(opt2, factor=0.5, patience=0, min_lr=0.05)
    for g in opt2.param_groups:
        g["lr"] *= 2  # 0.2 -> the min_lr clamp now differs from the unsteered copy x 2
    for m in (1.0, 2.0, 3.0, 4.0):
        s2.step(m)
    assert opt2.param_groups[0]["lr"] != pytest.approx(2 * 0.05)


@pytest.mark.parametrize("name", ["ReduceLROnPlateau"])
def test_plateau_min_lr_clamp_follows_the_unsteered_copy(name):
    opt, ref_opt = _opt(), _opt()
    sched = S.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=0.05)
    ref = S.ReduceLROnPlateau(ref_opt, factor=0.5, patience=0, min_lr=0.05)
    st = Steering()
    st.attach(opt, sched)
    assert st.apply(pb.SCALE_LR, 2.0).ok
    for m in (1.0, 2.0, 3.0, 4.0):
        sched.step(m), ref.step(m)
        assert opt.param_groups[0]["lr"] == pytest.approx(2 * ref_opt.param_groups[0]["lr"])


def test_timm_scheduler_keeps_its_shape():
    timm_sched = pytest.importorskip("timm.scheduler")
    opt, ref_opt = _opt(), _opt()
    mk = lambda o: timm_sched.CosineLRScheduler(o, t_initial=30, warmup_t=5, warmup_lr_init=1e-3, t_in_epochs=False)
    sched, ref = mk(opt), mk(ref_opt)
    st = Steering()
    st.attach(opt, sched)
    mult = 1.0
    for i in range(30):
        if i == 10:
            assert st.apply(pb.SCALE_LR, 0.5).ok
            mult = 0.5
        for g, rg in zip(opt.param_groups, ref_opt.param_groups):
            assert g["lr"] == pytest.approx(rg["lr"] * mult, rel=1e-12), i
        sched.step_update(i + 1), ref.step_update(i + 1)


def test_no_scheduler_lr_is_set_and_stays_groups_keep_ratio():
    opt = _opt()
    st = Steering()
    st.attach(opt)
    out = st.apply(pb.SET_LR, 0.5)
    assert out.ok and out.old == 0.1 and out.new == pytest.approx(0.5)
    for _ in range(5):
        opt.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.1])


def test_hold_pins_the_lr_against_the_schedule():
    opt = _opt()
    sched = S.ExponentialLR(opt, gamma=0.5)
    st = Steering()
    st.attach(opt, sched)
    assert st.apply(pb.SET_LR, 0.03, hold=True).ok
    for _ in range(4):
        opt.step(), sched.step()
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.03, 0.006])
    # Releasing the hold (set_lr without hold): the schedule's shape resumes from there.
    assert st.apply(pb.SET_LR, 0.04).ok
    u = st.unsteered[0]
    opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.04 * 0.5) and st.unsteered[0] == pytest.approx(u * 0.5)


def test_weight_decay_keeps_ratios_and_no_decay_groups():
    opt = _opt()
    st = Steering()
    st.attach(opt)
    out = st.apply(pb.SET_WEIGHT_DECAY, 5e-4)
    assert out.ok and out.old == 1e-4 and out.new == 5e-4
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert not st.apply(pb.SET_WEIGHT_DECAY, -1.0).ok


@pytest.mark.parametrize("name,attr", [("StepLR", "gamma"), ("MultiStepLR", "gamma"), ("ExponentialLR", "gamma"),
                                       ("ReduceLROnPlateau", "factor"), ("SequentialLR", None)])
def test_set_lr_decay_changes_the_factor(name, attr):
    opt = _opt()
    sched = SCHEDULERS[name](opt)
    st = Steering()
    st.attach(opt, sched)
    out = st.apply(pb.SET_LR_DECAY, 0.25)
    assert out.ok, out.message
    holder = sched._schedulers[1] if name == "SequentialLR" else sched
    assert getattr(holder, attr or "gamma") == 0.25


def test_set_lr_decay_rejected_with_why():
    opt = _opt()
    st = Steering()
    st.attach(opt, S.CosineAnnealingLR(opt, T_max=10))
    out = st.apply(pb.SET_LR_DECAY, 0.5)
    assert not out.ok and "CosineAnnealingLR has no decay factor" in out.message
    st2 = Steering()
    st2.attach(_opt())
    assert "no scheduler" in st2.apply(pb.SET_LR_DECAY, 0.5).message
    st3 = Steering()
    st3.attach(opt, S.StepLR(opt, 3))
    assert not st3.apply(pb.SET_LR_DECAY, 1.5).ok


def test_zero_lr_set_lr_rejected_scale_ok():
    opt = _opt()
    sched = S.LambdaLR(opt, lambda s: s / 4)  # LR 0 at step 0
    st = Steering()
    st.attach(opt, sched)
    out = st.apply(pb.SET_LR, 0.1)
    assert not out.ok and "LR is 0" in out.message
    assert st.apply(pb.SET_LR, 0.1, hold=True).ok and opt.param_groups[0]["lr"] == 0.1


def test_knobs_bounds_and_unknown_names():
    st = Steering()
    tau = st.knob("tau", 0.99, low=0.9, high=1.0)
    assert st.apply(pb.SET_KNOB, 0.995, knob="tau").ok and tau.value == 0.995
    out = st.apply(pb.SET_KNOB, 1.5, knob="tau")
    assert not out.ok and "outside" in out.message and tau.value == 0.995
    out = st.apply(pb.SET_KNOB, 1.0, knob="beta")
    assert not out.ok and "'beta'" in out.message and "tau" in out.message
    assert not st.apply(pb.SET_LR, 0.1).ok  # no optimizer attached
    with pytest.raises(ValueError, match="low"):
        st.knob("x", 1.0, low=2.0, high=1.0)
    with pytest.raises(ValueError, match="value"):
        st.knob("y", float("nan"))
    assert not st.apply(pb.SET_KNOB, float("inf"), knob="tau").ok


def test_state_dict_round_trip_resumes_steered():
    opt = _opt()
    sched = S.StepLR(opt, step_size=3, gamma=0.5)
    st = Steering()
    st.attach(opt, sched)
    st.knob("tau", 0.9)
    st.apply(pb.SCALE_LR, 4.0), st.apply(pb.SET_LR_DECAY, 0.1), st.apply(pb.SET_KNOB, 0.95, knob="tau")
    for _ in range(2):
        opt.step(), sched.step()
    state = copy.deepcopy({"st": st.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    opt2 = _opt()
    sched2 = S.StepLR(opt2, step_size=3, gamma=0.5)
    opt2.load_state_dict(state["opt"]), sched2.load_state_dict(state["sched"])
    st2 = Steering()
    st2.attach(opt2, sched2)
    st2.knob("tau", 0.9)
    st2.load_state_dict(state["st"])
    assert st2.knobs["tau"].value == 0.95 and st2.multiplier == 4.0 and sched2.gamma == 0.1
    for _ in range(3):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


class _FakeSession:
    def __init__(self, *a, **k):
        self.acks, self.experiment_id, self.cancelled, self.declared = [], 7, "", 0

    def ack(self, command_id, outcome, step):
        self.acks.append((command_id, outcome, step))

    def declare_knobs(self):
        self.declared += 1

    def finish(self, state, message, timeout):
        self.final = (state, message)
        return []


@pytest.fixture
def run(monkeypatch):
    monkeypatch.setattr("trainctl.attach.run.Session", _FakeSession)
    return Run(name="t", config={"a": 1, "p": __import__("pathlib").Path("/x")})


def test_rows_one_per_step_with_lr_and_commands_acked_at_the_boundary(run):
    opt = _opt()
    run.attach(opt, S.StepLR(opt, step_size=2, gamma=0.5))
    tau = run.knob("tau", 0.5, low=0, high=1)
    for i in range(5):
        run.step()
        if i == 2:
            run._due.append(pb.ControlCommand(command_id="c1", kind=pb.SET_KNOB, value=0.7, knob="tau"))
            run._due.append(pb.ControlCommand(command_id="c2", kind=pb.SCALE_LR, value=2.0))
            assert tau.value == 0.5  # not before the next boundary
        run.log(loss=torch.tensor(float(i)), acc=i / 10)
        run.log(extra=1.0)
        opt.step()
        run.steering.scheduler.step()
    run.finish()
    rows = list(run._rows)
    assert [r[1] for r in rows] == [0, 1, 2, 3, 4]
    assert all(set(r[4]) == {"lr", "loss", "acc", "extra"} for r in rows)
    assert tau.value == 0.7
    (c1, o1, s1), (c2, o2, s2) = run._session.acks
    assert (c1, s1, o1.ok, o1.old, o1.new) == ("c1", 3, True, 0.5, 0.7)
    assert (c2, s2, o2.ok) == ("c2", 3, True) and o2.new == pytest.approx(2 * o2.old)
    assert rows[3][4]["lr"] == pytest.approx(o2.new)
    assert run._session.final == (pb.COMPLETED, "")
    assert run.config == {"a": 1.0, "p": "/x"}


def test_context_manager_states(monkeypatch):
    monkeypatch.setattr("trainctl.attach.run.Session", _FakeSession)
    with pytest.raises(RuntimeError):
        with Run(name="f") as r:
            raise RuntimeError("boom\nsecond line")
    assert r._session.final == (pb.FAILED, "RuntimeError: boom")
    with pytest.raises(KeyboardInterrupt):
        with Run(name="c") as r2:
            raise KeyboardInterrupt()
    assert r2._session.final[0] == pb.CANCELLED
    import argparse
    assert Run(name="n", config=argparse.Namespace(lr=0.1, name="x")).config == {"lr": 0.1, "name": "x"}
    with pytest.raises(TypeError, match="config"):
        Run(name="bad", config=[1, 2])


def test_tensor_rows_copied_out_in_one_batch():
    from trainctl.attach.session import rows_to_plain
    raw = [(pb.STEP, i, 0, 0.0, {"loss": torch.tensor(i * 0.5), "n": i}) for i in range(100)]
    plain = rows_to_plain(raw)
    assert [r[4]["loss"] for r in plain] == [i * 0.5 for i in range(100)]
    assert all(isinstance(r[4]["n"], float) for r in plain)
    assert math.isnan(rows_to_plain([(1, 0, 0, 0.0, {"x": float("nan")})])[0][4]["x"])


def test_rows_before_registration_spill_to_disk_and_come_back_in_order(tmp_path, monkeypatch):
    from trainctl.attach import session
    monkeypatch.setattr(session, "PRE_ATTACH_IN_MEMORY", 100)
    pre = session._PreAttach(tmp_path / "pre.jsonl")
    for i in range(0, 1000, 10):
        pre.add([(pb.STEP, s, 0, 1.5, {"loss": s / 2}) for s in range(i, i + 10)])
        assert len(pre.rows) <= 110  # bounded memory; the rest is on disk
    assert len(pre) == 1000 and (tmp_path / "pre.jsonl").exists()
    rows = pre.take()
    assert [r[1] for r in rows] == list(range(1000)) and rows[7][4] == {"loss": 3.5}
    assert not (tmp_path / "pre.jsonl").exists() and len(pre) == 0


def test_outage_rows_are_sealed_into_bounded_memory_then_disk(tmp_path):
    """While no stream is open the session seals queued rows (Outbox.seal_queued): the
    queue does not grow, batches past the bound go to the spill file, and a new stream
    resends them all, in order."""
    import threading
    from trainctl.outbox import Outbox
    ob = Outbox(in_memory_batches=5, spill_path=tmp_path / "spill.bin")
    for i in range(20):
        ob.add_rows(3, 1, [("STEP", s, 0, 0.0, {"loss": float(s)}) for s in range(i * 10, i * 10 + 10)])
        ob.seal_queued()
    assert len(ob._items) == 0 and ob.unacked.spilled == 15 and len(ob.unacked._memory) == 5
    stop = threading.Event()
    msgs = []
    for m in ob.stream(pb.WorkerMessage(hello=pb.Hello(worker_id="w")), pb.Heartbeat, 10.0, stop):
        msgs.append(m)
        if len(msgs) == 21:
            stop.set()
            ob._wake.set()
    steps = [r.step for m in msgs[1:] for r in m.metrics.rows]
    assert steps == list(range(200)) and [m.metrics.seq for m in msgs[1:]] == list(range(1, 21))


def test_a_command_sent_again_is_acked_again_never_applied_twice(run):
    opt = _opt()
    run.attach(opt)
    run.step()
    cmd = pb.ControlCommand(command_id="c", kind=pb.SCALE_LR, value=2.0)
    run._due.append(cmd)
    run.step()
    run._due.append(cmd)  # the server resends PENDING commands after a reconnect
    run.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    (_, o1, s1), (_, o2, s2) = run._session.acks
    assert o1 is o2 and s1 == s2 == 1


def test_replayed_commands_apply_at_their_recorded_steps(run):
    opt = _opt()
    run.attach(opt)
    tau = run.knob("tau", 0.5)
    run._due.append(pb.ControlRecord(command_id="r1", kind=pb.SET_KNOB, knob="tau", value=0.8, at_step=3))
    run._due.append(pb.ControlRecord(command_id="r2", kind=pb.SET_LR, value=0.3, at_step=5))
    seen = []
    for i in range(7):
        run.step()
        seen.append((tau.value, opt.param_groups[0]["lr"]))
    assert [t for t, _ in seen] == [0.5] * 3 + [0.8] * 4
    assert [lr for _, lr in seen] == pytest.approx([0.1] * 5 + [0.3] * 2)
    assert [(c, s) for c, _, s in run._session.acks] == [("r1", 3), ("r2", 5)]


def test_a_value_that_is_no_number_is_left_out_not_the_batch(caplog, monkeypatch):
    from trainctl.attach import rows
    from trainctl.attach.session import rows_to_plain
    monkeypatch.setattr(rows, "_warned", set())  # warned once per name per process: start afresh
    raw = [(pb.STEP, 0, 0, 0.0, {"loss": torch.tensor(1.0), "name": "abc", "vec": torch.ones(3)}),
           (pb.STEP, 1, 0, 0.0, {"loss": torch.tensor(2.0, dtype=torch.float16), "n": 3})]
    plain = rows_to_plain(raw)
    assert [r[4] for r in plain] == [{"loss": 1.0}, {"loss": 2.0, "n": 3.0}]
    assert "run.log(name=...)" in caplog.text and "run.log(vec=...)" in caplog.text


def test_logged_tensors_do_not_keep_the_autograd_graph(run):
    w = torch.nn.Parameter(torch.ones(3))
    loss = (w * 2).sum()
    run.step()
    run.log(loss=loss)
    run.log_epoch(val=loss)
    run.step()
    assert all(not v.requires_grad for r in run._rows for v in r[4].values() if hasattr(v, "requires_grad"))


def test_the_sdk_imports_neither_server_workers_client_nor_torch():
    import subprocess
    import sys
    code = ("import sys, trainctl, trainctl.attach\n"
            "bad = [m for m in sys.modules if m.split('.')[:2] in (['trainctl', 'server'], ['trainctl', 'workers'],"
            " ['trainctl', 'client'], ['trainctl', 'spec']) or m == 'torch']\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
