"""torch.optim.lr_scheduler references for exponential, linear, cosine_restarts, onecycle, plateau."""
import pytest

torch = pytest.importorskip("torch")
from torch.optim import lr_scheduler as tls  # noqa: E402

from tests.test_schedulers import BASE, EPOCHS, N, SPE, _opt, close, ours, torch_ref  # noqa: E402

from trainctl.schedules import build_schedule  # noqa: E402


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("gamma", [0.9, 0.5, 1.0])
def test_exponential_vs_torch(per_step, gamma):
    ref = torch_ref(lambda o, f: tls.ExponentialLR(o, gamma ** (1 / f)), per_step)
    close(ours({"name": "exponential", "gamma": gamma, "per_step": per_step}), ref, rel=1e-12)


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("start,end,total", [(1 / 3, 1.0, 5), (0.1, 0.8, 3), (1.0, 0.2, 12)])
def test_linear_vs_torch(per_step, start, end, total):
    ref = torch_ref(lambda o, f: tls.LinearLR(o, start, end, total * f), per_step)
    close(ours({"name": "linear", "start_factor": start, "end_factor": end, "total_iters": total, "per_step": per_step}), ref)


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("T_0,T_mult,eta_min", [(3, 1, 0.0), (2, 2, 1e-3), (1, 3, 0.01), (5, 1, 0.02)])
def test_cosine_restarts_vs_torch(per_step, T_0, T_mult, eta_min):
    ref = torch_ref(lambda o, f: tls.CosineAnnealingWarmRestarts(o, T_0 * f, T_mult, eta_min), per_step)
    spec = {"name": "cosine_restarts", "T_0": T_0, "T_mult": T_mult, "eta_min": eta_min, "per_step": per_step}
    close(ours(spec), ref)


ONECYCLE = [
    dict(),
    dict(max_lr=0.5, pct_start=0.25, div_factor=10, final_div_factor=100),
    dict(anneal_strategy="linear"),
    dict(three_phase=True),
    dict(three_phase=True, anneal_strategy="linear", max_lr=0.3, pct_start=0.4),
]


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("case", ONECYCLE, ids=[str(i) for i in range(len(ONECYCLE))])
def test_onecycle_vs_torch(per_step, case):
    kw = dict(case)
    kw.setdefault("max_lr", BASE)
    ref = torch_ref(lambda o, f: tls.OneCycleLR(o, total_steps=EPOCHS * f, **kw), per_step)
    close(ours({"name": "onecycle", "per_step": per_step, **case}), ref)


METRICS = [5, 4, 4, 4.0001, 4, 3.9, 3.95, 3.95, 3.95, 3.95, 3.2, 3.3, 3.3, 3.3, 3.3, 3.3, 3.3, 3.3, 3.3, 3.3]
PLATEAU = [
    dict(patience=1),
    dict(patience=2, factor=0.5, threshold=0.01),
    dict(patience=0, factor=0.5, cooldown=2, min_lr=0.02),
    dict(patience=1, threshold_mode="abs", threshold=0.05, factor=0.3),
    dict(patience=1, mode="max", factor=0.5),
    dict(patience=0, mode="max", threshold_mode="abs", threshold=0.5, factor=0.7, min_lr=0.01, eps=0.02),
]


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("case", PLATEAU, ids=[str(i) for i in range(len(PLATEAU))])
def test_plateau_vs_torch(per_step, case):
    epochs = len(METRICS)
    opt = _opt()
    ref_sched = tls.ReduceLROnPlateau(opt, **case)
    sched = build_schedule(
        {"name": "plateau", "per_step": per_step, **case}, base_lr=BASE, steps_per_epoch=SPE, epochs=epochs
    )
    ref, got = [], []
    for s in range(SPE * epochs):
        ref.append(opt.param_groups[0]["lr"])
        got.append(sched.lr_at(s))
        if (s + 1) % SPE == 0:
            e = s // SPE
            ref_sched.step(METRICS[e])
            sched.on_epoch_end(e, {"val_loss": METRICS[e], "other": 0.0})
    close(got, ref)
    assert min(ref) < BASE  # the case does reduce
