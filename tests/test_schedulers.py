"""Schedules vs the real torch / timm schedulers, step by step, per step and per epoch."""
import math
import sys

import pytest

torch = pytest.importorskip("torch")
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, TanhLRScheduler  # noqa: E402
from torch.optim import lr_scheduler as tls  # noqa: E402

from trainctl.schedules import build_schedule  # noqa: E402

BASE = 0.1
SPE = 7
EPOCHS = 12
N = SPE * EPOCHS


def _opt(lr=BASE):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def ours(params, *, base=BASE, spe=SPE, epochs=EPOCHS):
    s = build_schedule(params, base_lr=base, steps_per_epoch=spe, epochs=epochs)
    return [s.lr_at(i) for i in range(spe * epochs)]


def close(a, b, rel=1e-12):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rel * max(abs(x), abs(y), 1e-300), f"step {i}: ours {x!r} != reference {y!r}"


def torch_ref(make, per_step, spe=SPE, n=N):
    """LR of each step from a torch scheduler built by make(optimizer, units_per_epoch),
    stepped once per iteration (per_step) or once per epoch."""
    opt = _opt()
    sched = make(opt, spe if per_step else 1)
    out = []
    for i in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if per_step or (i + 1) % spe == 0:
            sched.step()
    return out


def timm_ref(cls, per_step, epoch_kwargs, spe=SPE, n=N, **kw):
    """timm scheduler with epoch-valued kwargs scaled to updates for step_update."""
    opt = _opt()
    f = spe if per_step else 1
    scaled = {}
    for k, v in epoch_kwargs.items():
        scaled[k] = (type(v)(x * f for x in v) if isinstance(v, (tuple, list)) else v * f) if v is not None else None
    noise_type = kw.pop("noise_type", None)
    sched = cls(opt, t_in_epochs=not per_step, **scaled, **kw)
    if noise_type:  # timm's base supports it, its subclasses don't pass it through
        sched.noise_type = noise_type
    out = []
    for i in range(n):
        if per_step:
            sched.step_update(i)
        else:
            sched.step(i // spe)
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("per_step", [True, False])
def test_constant(per_step):
    close(ours({"name": "constant", "per_step": per_step}), [BASE] * N)
    # timm's warmup + constant == cosine with an infinitely long cycle; check by hand
    got = ours({"name": "constant", "per_step": per_step, "warmup_epochs": 2, "warmup_lr": 0.01})
    for i, v in enumerate(got):
        t = i / SPE if per_step else i // SPE
        want = 0.01 + t * (BASE - 0.01) / 2 if t < 2 else BASE
        assert v == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("step_size,gamma", [(1, 0.5), (3, 0.1), (5, 0.7)])
def test_step_vs_torch(per_step, step_size, gamma):
    ref = torch_ref(lambda o, f: tls.StepLR(o, step_size * f, gamma), per_step)
    close(ours({"name": "step", "step_size": step_size, "gamma": gamma, "per_step": per_step}), ref)


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("milestones,gamma", [([2, 5, 9], 0.1), ([0, 3, 3, 8], 0.5), ([11], 0.3)])
def test_multistep_vs_torch(per_step, milestones, gamma):
    ref = torch_ref(lambda o, f: tls.MultiStepLR(o, [m * f for m in milestones], gamma), per_step)
    spec = {"name": "multistep", "milestones": list(reversed(milestones)), "gamma": gamma, "per_step": per_step}
    close(ours(spec), ref)
    assert spec["milestones"] == list(reversed(milestones))  # not sorted in place


COSINE_CASES = [
    dict(),
    dict(min_lr=1e-4),
    dict(warmup_epochs=2, warmup_lr=1e-4, min_lr=1e-5),
    dict(warmup_epochs=3, warmup_lr=1e-3, warmup_prefix=True, t_initial=9),
    dict(t_initial=4, cycle_limit=3, cycle_decay=0.5, min_lr=1e-3),
    dict(t_initial=2, cycle_mul=2.0, cycle_limit=3, cycle_decay=0.8, warmup_epochs=1, warmup_lr=1e-3),
    dict(t_initial=5, cycle_mul=1.5, cycle_limit=4, k_decay=2.0),
    dict(k_decay=0.5, min_lr=1e-4),
    dict(noise_range_t=(2, 9), noise_pct=0.5, noise_std=1.0, noise_seed=7),
    dict(noise_range_t=4, noise_pct=0.3, noise_std=0.5, warmup_epochs=2),
    dict(noise_range_t=(1, 11), noise_type="uniform", noise_pct=0.2),
]

_TIMM_NAMES = dict(min_lr="lr_min", warmup_epochs="warmup_t", warmup_lr="warmup_lr_init")
_EPOCH_VALUED = {"t_initial", "warmup_t", "noise_range_t"}


def _timm_kwargs(case):
    kw = {_TIMM_NAMES.get(k, k): v for k, v in case.items()}
    kw.setdefault("t_initial", EPOCHS)
    epoch = {k: kw.pop(k) for k in list(kw) if k in _EPOCH_VALUED}
    return epoch, kw


def _timm_cmp(cls, name, case, per_step):
    epoch, kw = _timm_kwargs(case)
    ref = timm_ref(cls, per_step, epoch, **kw)
    close(ours({"name": name, "per_step": per_step, **case}), ref)


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("case", COSINE_CASES, ids=[str(i) for i in range(len(COSINE_CASES))])
def test_cosine_vs_timm(case, per_step):
    _timm_cmp(CosineLRScheduler, "cosine", case, per_step)


TANH_POLY_CASES = [
    dict(),
    dict(warmup_epochs=2, warmup_lr=1e-4, min_lr=1e-5),
    dict(t_initial=4, cycle_limit=3, cycle_decay=0.5, min_lr=1e-3, warmup_epochs=1, warmup_prefix=True),
    dict(t_initial=3, cycle_mul=2.0, cycle_limit=3, noise_range_t=(2, 8)),
]


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("case", TANH_POLY_CASES + [dict(lb=-5, ub=4)], ids=[str(i) for i in range(5)])
def test_tanh_vs_timm(case, per_step):
    _timm_cmp(TanhLRScheduler, "tanh", case, per_step)


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize(
    "case", TANH_POLY_CASES + [dict(power=2.0, k_decay=1.5), dict(power=1.0, min_lr=1e-3)], ids=[str(i) for i in range(6)]
)
def test_poly_vs_timm(case, per_step):
    _timm_cmp(PolyLRScheduler, "poly", case, per_step)


def test_package_imports_without_torch():
    import subprocess

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from trainctl.schedules import preview\n"
        "v = preview({'name': 'cosine', 'noise_range_t': 1}, base_lr=0.1, steps_per_epoch=3, epochs=4)\n"
        "print(len(v))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "12"


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize(
    "case",
    [dict(step_size=3, gamma=0.5, warmup_epochs=2, warmup_lr=1e-3),
     dict(step_size=2, gamma=0.3, warmup_epochs=1, warmup_lr=0.0, warmup_prefix=True)],
)
def test_step_with_warmup_vs_timm(per_step, case):
    from timm.scheduler import StepLRScheduler

    epoch = {"decay_t": case["step_size"], "warmup_t": case["warmup_epochs"]}
    ref = timm_ref(StepLRScheduler, per_step, epoch, decay_rate=case["gamma"],
                   warmup_lr_init=case["warmup_lr"], warmup_prefix=case.get("warmup_prefix", False))
    close(ours({"name": "step", "per_step": per_step, **case}), ref)
