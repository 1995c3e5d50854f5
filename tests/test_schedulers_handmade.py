"""gradual_warmup and cawb against vectors computed from their formulas, plus the
upstream bugs they fix; hand checks of decay-factor changes for plateau/exponential."""
import math

import pytest

from trainctl.schedules import build_schedule, preview


def lrs(spec, base, spe, epochs, **kw):
    return preview(spec, base_lr=base, steps_per_epoch=spe, epochs=epochs, **kw)


# -- gradual_warmup ---------------------------------------------------------------------


def test_gradual_warmup_multiplier_per_epoch():
    # epoch e <= 4: 0.1 * ((3 - 1) * e / 4 + 1); then StepLR(step_size=2, gamma=0.5) from 0.3
    got = lrs(
        {"name": "gradual_warmup", "multiplier": 3, "total_epoch": 4, "per_step": False,
         "after": {"name": "step", "step_size": 2, "gamma": 0.5}},
        0.1, 2, 10,
    )
    per_epoch = [0.1, 0.15, 0.2, 0.25, 0.3, 0.3, 0.15, 0.15, 0.075, 0.075]
    assert got == pytest.approx([per_epoch[i // 2] for i in range(20)], rel=1e-12)


def test_gradual_warmup_multiplier_one_starts_at_zero_per_step():
    got = lrs({"name": "gradual_warmup", "multiplier": 1, "total_epoch": 2}, 0.4, 4, 4)
    want = [0.4 * min(s / 4 / 2, 1.0) for s in range(16)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_gradual_warmup_no_stale_lr_after_warmup():
    # upstream: the first epoch after warmup got the after-scheduler's stale last LR
    # (built from the un-multiplied base LR); here it is after(1) at base * multiplier.
    got = lrs(
        {"name": "gradual_warmup", "multiplier": 2, "total_epoch": 2, "per_step": False,
         "after": {"name": "cosine", "per_step": False, "t_initial": 4}},
        1.0, 1, 7,
    )
    cos = [2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert got == pytest.approx([1.0, 1.5] + cos, rel=1e-12)


def test_gradual_warmup_multiplier_one_with_plateau_warms_up():
    # upstream step_ReduceLROnPlateau used the multiplier>1 formula only, so multiplier 1
    # held base_lr during the "warmup".
    metrics = [3, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    got = lrs(
        {"name": "gradual_warmup", "multiplier": 1, "total_epoch": 3, "per_step": False,
         "after": {"name": "plateau", "patience": 1, "factor": 0.5}},
        0.3, 1, 10, metric_fn=lambda e: {"val_loss": metrics[e]},
    )
    # warmup 0, .1, .2; epochs 0-2 end inside the warmup so their metrics are ignored;
    # epoch 3 sets best=1, epochs 4, 5 are bad -> reduce after epoch 5; again after 7 and 9.
    want = [0.0, 0.1, 0.2, 0.3, 0.3, 0.3, 0.15, 0.15, 0.075, 0.075]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_gradual_warmup_decay_goes_to_after_and_keeps_multiplier():
    got = lrs(
        {"name": "gradual_warmup", "multiplier": 2, "total_epoch": 1, "per_step": False,
         "after": {"name": "exponential", "gamma": 0.5, "per_step": False}},
        1.0, 1, 6, controls=[(3, "set_lr_decay", 0.1)],
    )
    assert got == pytest.approx([1.0, 2.0, 1.0, 0.5, 0.05, 0.005], rel=1e-12)


# -- cawb -------------------------------------------------------------------------------


def cawb_ref(base, epochs, spe, eta_min, steps, step_scale, epoch_scale, warmup, per_step):
    """Straight from the description: boundaries, periods, per-batch warmup."""
    b = [warmup] + sorted(s for s in set(steps) if warmup < s < epochs) + [epochs]
    out = []
    for s in range(epochs * spe):
        if s < warmup * spe:
            out.append(base * s / (warmup * spe))
            continue
        t = s / spe if per_step else s // spe
        i = max(k for k in range(len(b) - 1) if b[k] <= t)
        gap = b[i + 1] - b[i] + (epoch_scale if i < len(b) - 2 else 0)
        c = (1 + math.cos(math.pi * (t - b[i]) / gap)) / 2
        out.append(step_scale**i * base * (c * (1 - eta_min) + eta_min))
    return out


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize(
    "eta_min,steps,step_scale,epoch_scale,warmup",
    [(0.05, [4, 8], 0.8, 1.0, 0), (0.1, [9, 3, 6], 0.5, 2.0, 2), (0.0, [], 0.7, 1.0, 1), (0.2, [1, 20], 0.6, 0.0, 3)],
)
def test_cawb_formula(per_step, eta_min, steps, step_scale, epoch_scale, warmup):
    spec = {"name": "cawb", "eta_min": eta_min, "steps": steps, "step_scale": step_scale,
            "epoch_scale": epoch_scale, "warmup_epoch": warmup, "per_step": per_step}
    given = list(steps)
    got = lrs(spec, 0.2, 3, 12)
    assert steps == given  # upstream sorted the caller's list in place
    assert got == pytest.approx(cawb_ref(0.2, 12, 3, eta_min, steps, step_scale, epoch_scale, warmup, per_step), rel=1e-12)


def test_cawb_small_vector():
    # base 1, epochs 6, steps [3], warmup 1, per epoch, step_scale .5, eta_min 0, epoch_scale 1
    got = lrs({"name": "cawb", "steps": [3], "warmup_epoch": 1, "step_scale": 0.5, "eta_min": 0.0,
               "per_step": False}, 1.0, 2, 6)
    seg0 = [(1 + math.cos(math.pi * x / 3)) / 2 for x in (0, 1)]      # period 3 - 1 + 1
    seg1 = [0.5 * (1 + math.cos(math.pi * x / 3)) / 2 for x in (0, 1, 2)]  # last: 6 - 3
    per_epoch = seg0 + seg1
    assert got == pytest.approx([0.0, 0.5] + [per_epoch[i // 2 - 1] for i in range(2, 12)], rel=1e-12, abs=1e-15)


def test_cawb_holds_past_the_last_segment_and_warmup_is_never_negative():
    s = build_schedule({"name": "cawb", "steps": [2], "warmup_epoch": 1, "eta_min": 0.1, "step_scale": 0.5},
                       base_lr=1.0, steps_per_epoch=4, epochs=4)
    end = 0.5 * 0.1
    assert [s.lr_at(k) for k in (16, 17, 40)] == pytest.approx([end] * 3)
    warm = [s.lr_at(k) for k in range(4)]
    assert warm == pytest.approx([0, 0.25, 0.5, 0.75]) and min(warm) >= 0


def test_cawb_set_decay_by_hand():
    got = lrs({"name": "cawb", "steps": [2, 4], "eta_min": 0.0, "step_scale": 0.5, "epoch_scale": 0, "per_step": False},
              1.0, 1, 6, controls=[(3, "set_lr_decay", 0.1)])
    c = [1.0, 0.5]  # (1 + cos(pi * x / 2)) / 2 for x = 0, 1
    assert got == pytest.approx([1, 0.5, 0.5 * c[0], 0.5 * c[1], 0.05 * c[0], 0.05 * c[1]], rel=1e-12)


# -- other decay hand checks ------------------------------------------------------------


def test_plateau_set_decay_by_hand():
    got = lrs({"name": "plateau", "patience": 0, "factor": 0.5}, 1.0, 1, 6, controls=[(2, "set_lr_decay", 0.1)])
    # constant metric: epoch 0 improves; every later epoch is bad -> reduce after epochs 1..
    assert got == pytest.approx([1, 1, 0.5, 0.05, 0.005, 0.0005], rel=1e-12)


def test_exponential_per_step_set_decay_by_hand():
    got = lrs({"name": "exponential", "gamma": 0.5}, 1.0, 4, 3, controls=[(6, "set_lr_decay", 0.25)])
    want = [0.5 ** (s / 4) if s <= 6 else 0.5 ** 1.5 * 0.25 ** ((s - 6) / 4) for s in range(12)]
    assert got == pytest.approx(want, rel=1e-12)


def test_preview_default_metric_plateau_decays_every_patience_plus_one_epochs():
    got = lrs({"name": "plateau", "patience": 2, "factor": 0.5, "per_step": False}, 1.0, 1, 11)
    assert got == pytest.approx([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125])


def test_plateau_missing_metric_is_a_clear_error():
    s = build_schedule({"name": "plateau", "monitor": "val_acc", "mode": "max"}, base_lr=1, steps_per_epoch=1, epochs=3)
    with pytest.raises(ValueError, match="val_acc"):
        s.on_epoch_end(0, {"val_loss": 1.0})


def upstream_cawb_driver(base, epochs, spe, warmup, epoch_lr):
    """How upstream's CosineAnnealingWarmbootingLR is driven (YOLO train loops):
    `step_batch()` before every batch sets base * i / warmup_iters while i < warmup_iters
    and otherwise leaves the optimizer's LR alone; `step()` after every epoch sets the
    next epoch's LR (`epoch_lr(e)`, the cawb formula)."""
    warmup_iters = spe * warmup
    lr, i, out = base, -1, []
    for e in range(epochs):
        if e > 0:
            lr = epoch_lr(e)
        for _ in range(spe):
            i += 1
            if i < warmup_iters:
                lr = base * i / warmup_iters
            out.append(lr)
    return out


@pytest.mark.parametrize("warmup,spe", [(1.5, 4), (1.3, 4), (0.5, 3), (2.25, 4), (2, 4), (1.7, 3)])
def test_cawb_fractional_warmup_per_epoch_matches_upstream(warmup, spe):
    """Issue 11 item 21: a warmup ending mid-epoch keeps its last LR until the next
    epoch (trainctl dipped to the warmup value at the epoch's start)."""
    kw = dict(eta_min=0.05, steps=[4], step_scale=0.8, epoch_scale=1.0)
    epochs = 8
    curve = cawb_ref(0.1, epochs, 1, warmup=warmup, per_step=False, **kw)  # one step per epoch: the epoch LRs
    ref = upstream_cawb_driver(0.1, epochs, spe, warmup, lambda e: curve[e])
    got = lrs({"name": "cawb", "warmup_epoch": warmup, "per_step": False, **kw}, 0.1, spe, epochs)
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_cawb_issue_vector():
    got = lrs({"name": "cawb", "warmup_epoch": 1.5, "per_step": False}, 0.1, 4, 6)
    assert got[:8] == pytest.approx([0, 0.1 / 6, 0.2 / 6, 0.05, 0.4 / 6, 0.5 / 6, 0.5 / 6, 0.5 / 6], rel=1e-12)
    assert got[8] > got[7]  # never below the warmup's last value before the cosine starts
