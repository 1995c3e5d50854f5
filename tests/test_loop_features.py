"""Training features, one test each: AMP, clipping, EMA, mixup/cutmix, multi-scale,
gradient accumulation, channels_last, torch.compile, seeds, best accuracy, non-finite
losses and the batched (no per-step sync) step metrics."""
from __future__ import annotations

import math
import os

import pytest
import torch

from tests.test_loop_support import epoch_rows, make_trainer, one_thread, step_rows, tiny_spec  # noqa: F401
from trainctl.spec import EmaParams, MultiScaleParams
from trainctl.workers.engine.clip import clip_gradients
from trainctl.workers.engine.context import STEP, ListSink
from trainctl.workers.engine.ema import ModelEma
from trainctl.workers.engine.loop import TrainingError
from trainctl.workers.engine.multiscale import MultiScale
from trainctl.workers.engine.stepstats import StepStats

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _record_forward(trainer):
    """Wraps the training forward; returns the list of input shapes/outputs it saw."""
    seen = []
    inner = trainer.forward

    def forward(x):
        out = inner(x)
        seen.append((tuple(x.shape), out.dtype, x.is_contiguous(memory_format=torch.channels_last)))
        return out
    trainer.forward = forward
    return seen


# ---------------------------------------------------------------- AMP
def test_bf16_autocast_on_cpu():
    trainer, sink, _ = make_trainer(tiny_spec(train={"amp": "bf16", "epochs": 1, "max_steps_per_epoch": 2}))
    seen = _record_forward(trainer)
    summary = trainer.run()
    assert {dtype for _, dtype, _ in seen} == {torch.bfloat16}
    assert trainer.precision.scaler is None
    assert math.isfinite(summary.train_loss) and all(math.isfinite(v) for _, v in sink.series("loss"))


def test_fp16_is_refused_on_cpu():
    with pytest.raises(TrainingError, match="fp16 needs a CUDA device"):
        make_trainer(tiny_spec(train={"amp": "fp16"}))


@pytest.mark.gpu
@cuda
def test_fp16_with_grad_scaler_on_cuda():
    trainer, sink, _ = make_trainer(tiny_spec(train={"amp": "fp16", "device": "cuda", "clip_grad": 1.0,
                                                     "epochs": 1, "max_steps_per_epoch": 3}))
    seen = _record_forward(trainer)
    trainer.run()
    assert trainer.precision.scaler is not None and {d for _, d, _ in seen} == {torch.float16}
    assert all(math.isfinite(v) for _, v in sink.series("loss"))


@pytest.mark.gpu
@cuda
def test_cuda_step_metrics_are_batched_and_complete():
    trainer, sink, _ = make_trainer(tiny_spec(train={"device": "cuda", "epochs": 1, "max_steps_per_epoch": 20}))
    assert trainer.stats.sync_every > 1
    trainer.run()
    assert [s for s, _ in sink.series("loss")] == list(range(20))


# ---------------------------------------------------------------- clipping
def _grads():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8))]
    for p in ps:
        p.grad = torch.randn_like(p) * 10
    return ps


def test_clip_by_norm_value_and_agc():
    ps = _grads()
    clip_gradients(ps, "norm", 1.0)
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ps])) == pytest.approx(1.0, rel=1e-5)
    ps = _grads()
    clip_gradients(ps, "value", 0.5)
    assert max(float(p.grad.abs().max()) for p in ps) <= 0.5
    from timm.utils import adaptive_clip_grad
    ps, ref = _grads(), _grads()
    clip_gradients(ps, "agc", 0.01)
    adaptive_clip_grad(ref, clip_factor=0.01)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps, ref))
    assert not torch.equal(ps[0].grad, _grads()[0].grad)


def test_clipping_happens_before_the_optimizer_step():
    spec = tiny_spec(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0},
                     train={"clip_grad": 1e-3, "epochs": 1, "max_steps_per_epoch": 1},
                     schedule={"name": "constant"})
    trainer, _, _ = make_trainer(spec)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run()
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)])
    assert 0 < float(torch.linalg.vector_norm(delta)) <= 0.1 * 1e-3 * 1.0001


@pytest.mark.parametrize("mode", ["value", "agc"])
def test_clip_modes_train(mode):
    trainer, sink, _ = make_trainer(tiny_spec(train={"clip_grad": 0.05, "clip_mode": mode, "epochs": 1,
                                                     "max_steps_per_epoch": 2}))
    trainer.run()
    assert all(math.isfinite(v) for _, v in sink.series("loss"))


# ---------------------------------------------------------------- EMA
def _ema(total=100, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, ModelEma(EmaParams(**kw), model, total_steps=total)


def test_ema_update_uses_the_decay_and_timm_warmup():
    model, ema = _ema(decay=0.9)
    for step in range(3):
        prev = ema.module.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model, step)
        d = 0.0 if step == 0 else 0.9          # timm copies the model on its first update only
        assert torch.allclose(ema.module.weight, d * prev + (1 - d) * model.weight)
    model, ema = _ema(decay=0.999, warmup=True)
    ema.update(model, 50)
    assert ema.used_decay(50) == pytest.approx(1 - (1 + 50) ** (-2 / 3))   # warmup caps the decay
    assert ema.target_decay(50) == 0.999


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("decay", [0.9, 0.9998])
def test_ema_matches_timm_model_ema_v3_as_timm_train_drives_it(warmup, decay):
    """Issue 11 item 22: the same weights as timm's ModelEmaV3 updated the way timm's
    train.py does (`num_updates += 1; model_ema.update(model, step=num_updates)`), at
    every step; the old 0-based call lagged one update (copied the model twice)."""
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    ours = ModelEma(EmaParams(decay=decay, warmup=warmup), model, total_steps=20)
    ref = ModelEmaV3(model, decay=decay, use_warmup=warmup)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    num_updates = 0
    used = []
    for step in range(8):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        num_updates += 1
        ref.update(model, step=num_updates)
        used.append(ours.used_decay(step))
        ours.update(model, step)
        for (k, a), b in zip(ours.module.state_dict().items(), ref.module.state_dict().values()):
            assert torch.equal(a, b), (step, k)
    assert used == [ref.get_decay(n) for n in range(1, 9)]
    assert used[0] == 0.0 and used[1] > 0  # one copy, then averaging
    if warmup:  # the figures: 0, 0.370, 0.519, 0.603
        assert used[:4] == pytest.approx([0, 0.370, 0.519, 0.603], abs=1e-3)


def test_cosine_ema_decay_schedule_and_set_ema_decay_compose():
    _, ema = _ema(total=100, decay=0.99, cosine_to_one=True)
    assert ema.target_decay(0) == pytest.approx(0.99)
    assert ema.target_decay(50) == pytest.approx(1 - 0.01 * 0.5)
    assert ema.target_decay(100) == pytest.approx(1.0)
    tau = [ema.target_decay(k) for k in range(101)]
    assert all(a <= b for a, b in zip(tau, tau[1:]))
    old, new = ema.set_decay(30, 0.9)
    assert old == pytest.approx(tau[30]) and new == 0.9 and ema.target_decay(30) == pytest.approx(0.9)
    # The cosine shape goes on from the new value: 1 - tau shrinks by the same factor.
    for k in (40, 70, 99):
        assert (1 - ema.target_decay(k)) / (1 - ema.target_decay(30)) == pytest.approx((1 - tau[k]) / (1 - tau[30]))
    assert ema.target_decay(100) == pytest.approx(1.0)


def test_ema_is_evaluated_every_epoch_alongside_the_raw_model():
    spec = tiny_spec(train={"ema": {"decay": 0.5, "cosine_to_one": True}, "epochs": 2, "max_steps_per_epoch": 3})
    trainer, sink, _ = make_trainer(spec)
    trainer.run()
    rows = epoch_rows(sink)
    assert set(rows) == {0, 1}
    for row in rows.values():
        assert {"ema_val_top1", "ema_val_loss", "ema_val_balanced_acc", "ema_decay", "val_top1"} <= set(row)
    assert rows[1]["ema_decay"] == pytest.approx(trainer.ema.target_decay(5)) and rows[1]["ema_decay"] > 0.5
    assert rows[0]["ema_val_loss"] != rows[0]["val_loss"]


# ---------------------------------------------------------------- mixup / cutmix
def test_mixup_soft_targets_with_smoothing_until_off_epoch():
    spec = tiny_spec(train={"mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1,
                                      "off_epoch": 1}, "epochs": 2, "max_steps_per_epoch": 2},
                     loss={"name": "soft_target"})
    trainer, _, _ = make_trainer(spec)
    targets = []
    inner = trainer.loss_fn.forward
    trainer.loss_fn.forward = lambda logits, t: (targets.append(t), inner(logits, t))[1]
    trainer.run()
    assert [t.dtype.is_floating_point for t in targets] == [True, True, False, False]
    soft = targets[0]
    assert soft.shape == (32, 10) and float(soft.min()) >= 0.1 / 10 - 1e-7
    assert torch.allclose(soft.sum(1), torch.ones(32))


def test_mixup_needs_an_even_batch():
    with pytest.raises(TrainingError, match="even data.batch_size"):
        make_trainer(tiny_spec(data={"dataset": "digits", "batch_size": 31, "img_size": 16},
                               train={"mixup": {}}))


# ---------------------------------------------------------------- multi-scale
def test_multiscale_sizes_start_at_the_largest_and_are_a_function_of_the_step():
    ms = MultiScale(MultiScaleParams(resize_range=(16, 64), every=4), seed=1)
    sizes = [ms.size_at(s) for s in range(400)]
    assert sizes[:4] == [64] * 4
    assert set(sizes) == {16, 32, 48, 64}
    assert all(len(set(sizes[i:i + 4])) == 1 for i in range(0, 400, 4))
    assert sizes == [MultiScale(MultiScaleParams(resize_range=(16, 64), every=4), seed=1).size_at(s)
                     for s in range(400)]


def test_multiscale_batches_in_the_loop():
    spec = tiny_spec(train={"multiscale": {"resize_range": [16, 48], "every": 2}, "epochs": 1,
                            "max_steps_per_epoch": 6, "grad_accum": 1})
    trainer, _, _ = make_trainer(spec)
    seen = _record_forward(trainer)
    trainer.run()
    sizes = [shape[-1] for shape, _, _ in seen]
    assert sizes[:2] == [48, 48] and set(sizes) <= {16, 32, 48}
    assert sizes == [trainer.multiscale.size_at(s) for s in range(6)]
    assert trainer.data.img_size == 16      # validation stays at the data size


# ---------------------------------------------------------------- accumulation, layout, compile
def test_grad_accum_matches_one_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
    grads = []
    for accum, bs in ((1, 32), (2, 16), (4, 8)):
        spec = tiny_spec(data={"dataset": "digits", "batch_size": bs, "img_size": 16},
                         train={"grad_accum": accum}, loss={"name": "cross_entropy"})
        trainer, _, _ = make_trainer(spec)
        trainer.model.eval()     # BatchNorm in train mode would see different batches
        trainer.precision.step = lambda opt, before: None
        batches = iter(list(zip(x.split(bs), y.split(bs))))
        loss, _, n = trainer._train_step(batches, epoch=0)
        assert n == 32
        grads.append((float(loss) / n, [p.grad.clone() for p in trainer.model.parameters()]))
    for loss, g in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g, grads[0][1]))


def test_grad_accum_counts_optimizer_steps_per_epoch():
    trainer, sink, _ = make_trainer(tiny_spec(data={"dataset": "digits", "batch_size": 16, "img_size": 16},
                                              train={"grad_accum": 3, "max_steps_per_epoch": 0, "epochs": 1}))
    assert trainer.steps_per_epoch == len(trainer.data.train) // 3


def test_channels_last():
    spec = tiny_spec(train={"epochs": 1, "max_steps_per_epoch": 2})
    plain, plain_sink, _ = make_trainer(spec)
    plain.run()
    trainer, sink, _ = make_trainer(tiny_spec(train={"epochs": 1, "max_steps_per_epoch": 2, "channels_last": True}))
    seen = _record_forward(trainer)
    trainer.run()
    assert all(cl for _, _, cl in seen)
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for (_, a), (_, b) in zip(sink.series("loss"), plain_sink.series("loss")):
        assert a == pytest.approx(b, rel=1e-4)


def test_compile_flag_with_a_debug_backend():
    spec = tiny_spec(train={"epochs": 1, "max_steps_per_epoch": 2})
    plain, plain_sink, _ = make_trainer(spec)
    plain.run()
    trainer, sink, _ = make_trainer(tiny_spec(train={"epochs": 1, "max_steps_per_epoch": 2, "compile": "aot_eager"}))
    assert trainer.forward is not trainer.model
    trainer.run()
    for (_, a), (_, b) in zip(sink.series("loss"), plain_sink.series("loss")):
        assert a == pytest.approx(b, rel=1e-5)
    assert not any(k.startswith("_orig_mod") for k in trainer.model.state_dict())


@pytest.mark.slow
@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRAINCTL_TEST_INDUCTOR")),
                    reason="inductor on CPU compiles C++ for ~50 s; set TRAINCTL_TEST_INDUCTOR=1")
def test_compile_with_inductor():
    trainer, sink, _ = make_trainer(tiny_spec(train={"epochs": 1, "max_steps_per_epoch": 2, "compile": True}))
    trainer.run()
    assert all(math.isfinite(v) for _, v in sink.series("loss"))


# ---------------------------------------------------------------- seeds, best accuracy
def test_seed_determines_the_run():
    runs = []
    for seed in (0, 0, 1):
        trainer, sink, _ = make_trainer(tiny_spec(train={"seed": seed, "epochs": 1, "max_steps_per_epoch": 3,
                                                         "mixup": {"prob": 0.5}}, model={"name": "test_resnet",
                                                                                         "drop_rate": 0.3}))
        trainer.run()
        runs.append(step_rows(sink))
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_best_accuracy_tracking():
    trainer, sink, _ = make_trainer(tiny_spec(train={"epochs": 3, "max_steps_per_epoch": 3}))
    summary = trainer.run()
    rows = epoch_rows(sink)
    running = 0.0
    for epoch in range(3):
        running = max(running, rows[epoch]["val_top1"])
        assert rows[epoch]["best_val_top1"] == running
    best_epoch = max(range(3), key=lambda e: (rows[e]["val_top1"], -e))
    assert (summary.best_val_top1, summary.best_epoch) == (running, best_epoch)
    assert summary.val_top1 == rows[2]["val_top1"] and summary.val_balanced_acc == rows[2]["val_balanced_acc"]


# ---------------------------------------------------------------- non-finite losses
def _poison(trainer, at_call: int):
    calls = {"n": 0}
    inner = trainer.loss_fn.forward

    def forward(logits, target):
        calls["n"] += 1
        loss = inner(logits, target)
        return loss * float("nan") if calls["n"] == at_call + 1 else loss
    trainer.loss_fn.forward = forward


def test_nonfinite_loss_fails_the_run_at_its_step():
    trainer, _, _ = make_trainer(tiny_spec())
    _poison(trainer, at_call=2)
    with pytest.raises(TrainingError, match=r"^non-finite loss at step 2$"):
        trainer.run()


def test_nonfinite_loss_skipped_when_asked():
    trainer, sink, _ = make_trainer(tiny_spec(train={"on_nonfinite": "skip", "ema": {"decay": 0.9}}))
    _poison(trainer, at_call=2)
    summary = trainer.run()
    losses = dict(sink.series("loss"))
    assert math.isnan(losses[2]) and all(math.isfinite(v) for s, v in losses.items() if s != 2)
    assert epoch_rows(sink)[0]["nonfinite_steps"] == 1 and math.isfinite(summary.train_loss)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.ema.module.parameters())


# ---------------------------------------------------------------- batched step metrics
def test_step_stats_rows_do_not_depend_on_sync_every():
    torch.manual_seed(0)
    steps = [(torch.rand(()) * 64, torch.randint(0, 64, ()), 64) for _ in range(21)]
    steps[13] = (torch.tensor(float("inf")), torch.tensor(3), 64)
    out = []
    for every in (1, 8):
        sink = ListSink()
        stats = StepStats(sink, sync_every=every)
        for i, (loss, correct, n) in enumerate(steps):
            stats.add(i, 0, 0.1, loss, correct, n)
            if every == 8 and i < 7:
                assert sink.rows == []                    # nothing copied out yet
        sums = stats.flush()
        rows = [(s, step, e, {k: v for k, v in r.items() if k != "samples_per_sec"}) for s, step, e, r in sink.rows]
        out.append((rows, sums))
    assert out[0][0] == out[1][0] and len(out[0][0]) == 21 and all(r[0] == STEP for r in out[0][0])
    assert out[0][1] == out[1][1] and out[0][1].first_nonfinite_step == 13 and out[0][1].nonfinite_steps == 1


def test_per_class_accuracy_is_reported_and_averages_to_balanced_accuracy():
    from trainctl.spec import parse_spec
    from trainctl.workers.engine.context import EPOCH, ListSink, TrainingContext
    from trainctl.workers.engine.loop import Trainer

    spec = parse_spec({"name": "lt", "model": {"name": "resnet10t"},
                       "data": {"dataset": "digits_lt", "imbalance_ratio": 10, "batch_size": 32, "img_size": 32},
                       "train": {"epochs": 1, "max_steps_per_epoch": 3, "checkpoint_every": 0}}, check_model=False)
    sink = ListSink()
    Trainer(spec, TrainingContext(sink=sink)).run()
    (row,) = [v for scope, _, _, v in sink.rows if scope == EPOCH]
    per_class = [row[f"val_acc/{c}"] for c in range(10)]  # digits: named by the digit
    assert all(0.0 <= a <= 1.0 for a in per_class)
    assert abs(sum(per_class) / 10 - row["val_balanced_acc"]) < 1e-12
