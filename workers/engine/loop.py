"""The training loop: one experiment spec in, metrics out, steerable at every step.

It talks only to a `TrainingContext` (metrics sink + control inbox), so it runs the
same inside the worker agent, in tests and in `replay`. Features live in their own
modules (amp, clip, ema, mixing, multiscale, evaluate, checkpoint); this file is the
order in which they happen, which is what exact resume and replay depend on:

    per step:  controls -> LR of the step -> forward/backward (x grad_accum) -> clip ->
               optimizer step -> EMA update -> metrics (copied out in batches)
    per epoch: set_epoch (data, loss) ... evaluate raw and EMA -> schedule.on_epoch_end
               -> epoch row -> checkpoint

Under DDP (a `RankContext` from `distributed.py`, launched by `workers/ddp.py`) the same
order runs on every rank: each trains its shard through the DDP-wrapped model, the
controls of a step come from rank 0's inbox by broadcast, step metrics are summed over
ranks; rank 0 alone evaluates (its row is shared), logs, acks and writes checkpoints,
which every rank loads on resume.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainctl.spec import Spec
from trainctl.workers.engine.amp import Precision, PrecisionError
from trainctl.workers.engine.checkpoint import KEEP_WHILE_TRAINING, load_for_resume, save_checkpoint
from trainctl.workers.engine.clip import clip_gradients
from trainctl.workers.engine.context import EPOCH, Cancelled, Summary, TrainingContext, TrainingError  # noqa: F401 (re-exported)
from trainctl.workers.engine.control import ControlTargets, apply_command
from trainctl.workers.engine.data import build_data
from trainctl.workers.engine.distributed import RankContext
from trainctl.workers.engine.ema import ModelEma
from trainctl.workers.engine.evaluate import evaluate
from trainctl.workers.engine.losses import build_loss
from trainctl.workers.engine.mixing import build_mixer
from trainctl.workers.engine.models import build_model
from trainctl.workers.engine.multiscale import MultiScale
from trainctl.workers.engine.optim import build_optimizer
from trainctl.schedules import build_schedule
from trainctl.workers.engine.stepstats import StepStats

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device: 'cuda' requested but no CUDA device is visible")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def seed_everything(seed: int, deterministic: bool) -> None:
    # numpy and random too: timm's mixup/cutmix draw from numpy's global RNG.
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:  # speed over bitwise repeatability: autotune convolutions, as timm's train.py does
        torch.backends.cudnn.benchmark = True


def compile_model(model: torch.nn.Module, setting) -> torch.nn.Module:
    """The callable used for training forwards; `model` itself stays the module that is
    checkpointed, EMA-tracked and evaluated (no `_orig_mod.` prefixes in checkpoints)."""
    if not setting:
        return model
    backend = "inductor" if setting is True else setting
    return torch.compile(model, backend=backend)


class Trainer:
    def __init__(self, spec: Spec, ctx: Optional[TrainingContext] = None, dist: Optional[RankContext] = None):
        self.spec = spec
        self.ctx = ctx or TrainingContext()
        self.dist = dist or RankContext()  # one process unless launched by workers/ddp.py
        tp = spec.train
        # The same seed on every rank: identical RNG streams, so rank 0's saved RNG state
        # is every rank's on resume (ranks differ by their data shard, not their RNG).
        seed_everything(tp.seed, tp.deterministic)
        self.device = self.dist.device if self.dist.enabled else pick_device(tp.device)
        try:
            self.precision = Precision(tp.amp, self.device)
        except PrecisionError as exc:
            raise TrainingError(str(exc)) from None
        self.data = build_data(spec.data, seed=tp.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        self.model = build_model(spec.model, num_classes=self.data.num_classes, in_chans=self.data.in_chans,
                                 loss_name=spec.loss.name).to(self.device)
        if tp.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = compile_model(self.dist.wrap(self.model), tp.compile)
        self.loss_fn = build_loss(spec.loss, num_classes=self.data.num_classes,
                                  class_counts=self.data.class_counts).to(self.device)
        self.optimizer = build_optimizer(spec.optimizer, self.model)
        try:
            self.steps_per_epoch = tp.steps_per_epoch(len(self.data.train), spec.data.batch_size)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        self.total_steps = self.steps_per_epoch * tp.epochs
        self.schedule = build_schedule(spec.schedule, base_lr=spec.optimizer.lr,
                                       steps_per_epoch=self.steps_per_epoch, epochs=tp.epochs)
        self.ema = ModelEma(tp.ema, self.model, self.total_steps, self.device) if tp.ema else None
        try:
            self.mixer = build_mixer(tp.mixup, self.data.num_classes, spec.data.batch_size)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        self.multiscale = MultiScale(tp.multiscale, tp.seed) if tp.multiscale else None
        self.targets = ControlTargets(self.schedule, self.optimizer, self.ema)
        # Stepping on GPU must not wait for the device: values stay on device and are
        # copied out in batches (every step on CPU, where a copy costs nothing).
        self.stats = StepStats(self.ctx.sink, sync_every=1 if self.device.type == "cpu" else 16,
                               reduce=self.dist.all_sum if self.dist.enabled else None,
                               world_size=self.dist.world_size)
        self.start_epoch, self.step, self.best, self.best_epoch = 0, 0, 0.0, -1

    # ------------------------------------------------------------------ the run
    def run(self) -> Summary:
        started = time.time()
        tp = self.spec.train
        self._maybe_resume()
        if not self.dist.agree(self.step):
            raise TrainingError("ranks resumed at different steps: every rank must see the same checkpoint directory")
        self.ctx.on_progress(self.step)  # built and resumed: the agent reports RUNNING now
        row = {"val_top1": 0.0, "val_loss": math.nan, "val_balanced_acc": 0.0, "train_loss": math.nan}
        last_progress = 0.0
        for epoch in range(self.start_epoch, tp.epochs):
            # Batch order is a pure function of (seed, epoch): what makes resume exact.
            self.data.set_epoch(epoch)
            self.loss_fn.set_epoch(epoch)
            self.model.train()
            t_epoch = time.perf_counter()
            batches = iter(self.data.train)
            for _ in range(self.steps_per_epoch):
                applied = self._apply_controls()
                lr = self.schedule.lr_at(self.step)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                loss, correct, n = self._train_step(batches, epoch)
                self.stats.add(self.step, epoch, lr, loss, correct, n)
                self.dist.trace("step", step=self.step, lrs=[g["lr"] for g in self.optimizer.param_groups],
                                loss=loss, n=n, applied=applied)
                self._check_finite(self.stats.first_nonfinite_step)
                self.step += 1
                now = time.monotonic()
                if now - last_progress > 0.5:
                    last_progress = now
                    self.ctx.on_progress(self.step)
            row = self._end_epoch(epoch, time.perf_counter() - t_epoch)
        return Summary(val_top1=row["val_top1"], best_val_top1=self.best, best_epoch=self.best_epoch,
                       val_balanced_acc=row["val_balanced_acc"], val_loss=row["val_loss"],
                       train_loss=row["train_loss"], steps=self.step, epochs=tp.epochs,
                       seconds=time.time() - started)

    def _apply_controls(self) -> list[str]:
        """Apply the commands due at this step (the same on every rank); ids applied."""
        commands, cancel_reason = self.dist.due_commands(self.ctx.inbox, self.step)
        if cancel_reason is not None:
            raise Cancelled(cancel_reason)
        for cmd in commands:
            ack = apply_command(cmd, self.step, self.targets)
            if self.dist.is_main:
                self.ctx.inbox.ack(ack)
        return [cmd.command_id for cmd in commands]

    def _train_step(self, batches, epoch: int):
        """One optimizer step; returns (mean loss, correct count, samples) with the
        first two still tensors on the device (StepStats reads them in bulk)."""
        tp = self.spec.train
        size = self.multiscale.size_at(self.step) if self.multiscale else None
        self.optimizer.zero_grad(set_to_none=True)
        loss_mean = correct = None
        n = 0
        for i in range(tp.grad_accum):
            x, y = next(batches)
            x, y = self._to_device(x, size), y.to(self.device, non_blocking=True)
            x, target = self.mixer(x, y, epoch) if self.mixer else (x, y)
            # DDP all-reduces gradients once per step, on the last micro-batch
            with self.dist.no_sync(self.forward, last=i == tp.grad_accum - 1):
                with self.precision.autocast():
                    logits = self.forward(x)
                    loss = self.loss_fn(logits, target)
                    if tp.grad_accum > 1:  # mean over the whole optimizer batch (equal micro-batches)
                        loss = loss / tp.grad_accum
                self.precision.backward(loss)
            # Few tensor ops here on purpose: at a few ms per step each one shows.
            hits = (logits.detach().argmax(1) == y).sum()
            loss_mean = loss.detach() if loss_mean is None else loss_mean + loss.detach()
            correct = hits if correct is None else correct + hits
            n += x.shape[0]
        # `skip` must decide before the update, so it reads the loss on the host: one
        # sync per step, the price of that option (the default `fail` has none).
        if tp.on_nonfinite == "skip" and not self.dist.all_finite(loss_mean):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_mean, correct, n
        self.precision.step(self.optimizer, self._clip)
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return loss_mean, correct, n

    def _to_device(self, x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if size is not None:
            x = MultiScale.resize(x, size)
        if self.spec.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _clip(self) -> None:
        tp = self.spec.train
        if tp.clip_grad is not None:
            clip_gradients(self.model.parameters(), tp.clip_mode, tp.clip_grad)

    def _check_finite(self, first_bad: Optional[int]) -> None:
        if first_bad is not None and self.spec.train.on_nonfinite == "fail":
            raise TrainingError(f"non-finite loss at step {first_bad}")

    def _evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return evaluate(model, self.data.val, device=self.device, num_classes=self.data.num_classes,
                        autocast=self.precision.autocast, channels_last=self.spec.train.channels_last,
                        class_names=self.data.class_names)

    def _end_epoch(self, epoch: int, seconds: float) -> dict[str, float]:
        sums = self.stats.flush()  # summed over ranks: the same on every rank
        self.ctx.sink.flush()  # the epoch's last steps go out before evaluation starts
        self._check_finite(sums.first_nonfinite_step)
        row = None
        if self.dist.is_main:  # the validation set is not sharded: rank 0 evaluates
            val = self._evaluate(self.model)
            row = {"train_loss": sums.loss_sum / max(sums.seen, 1) if sums.seen else math.nan,
                   "train_acc": sums.correct / max(sums.seen, 1), **val, "epoch_time": seconds,
                   "lr": self.schedule.lr_at(self.step - 1)}
            if sums.nonfinite_steps:
                row["nonfinite_steps"] = float(sums.nonfinite_steps)
            if self.ema is not None:
                ema_val = self._evaluate(self.ema.module)
                row.update({f"ema_{k}": v for k, v in ema_val.items()})
                row["ema_decay"] = self.ema.target_decay(self.step - 1)
        row = self.dist.share(row)  # plateau schedules and best epoch decide alike on all ranks
        if row["val_top1"] > self.best or self.best_epoch < 0:
            self.best, self.best_epoch = row["val_top1"], epoch
        row.update(best_val_top1=self.best, best_epoch=float(self.best_epoch))
        self.schedule.on_epoch_end(epoch, row)
        self.ctx.sink.log(EPOCH, self.step, epoch, row)
        self.ctx.sink.flush()
        every = self.spec.train.checkpoint_every
        if self.ctx.checkpoint_dir and every and (epoch + 1) % every == 0 and self.dist.is_main:
            if self.ctx.inbox.orphaned():  # its agent died: these steps may never reach the store
                raise Cancelled(self.ctx.inbox.cancel_reason)
            self._save(epoch)
        return row

    # ------------------------------------------------------------------ checkpoints
    def _save(self, epoch: int) -> None:
        # Control state lives in its targets: LR rescale/decay history in the schedule,
        # the EMA decay base in the EMA, weight decay in the optimizer's param groups.
        path = save_checkpoint(Path(self.ctx.checkpoint_dir), {
            "epoch": epoch, "step": self.step, "best": self.best, "best_epoch": self.best_epoch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.precision.state_dict(),
        }, self.ctx.lineage, keep=max(KEEP_WHILE_TRAINING, self.spec.train.keep_checkpoints))
        self.dist.trace("checkpoint", epoch=epoch, step=self.step)
        log.debug("checkpoint %s", path)
        self.ctx.on_checkpoint(str(path), self.step)

    def _maybe_resume(self) -> None:
        if not self.ctx.checkpoint_dir:
            return
        found = load_for_resume(Path(self.ctx.checkpoint_dir), self.ctx.lineage, set_aside=self.dist.is_main,
                                note=self._note)
        if found is None:
            return
        path, state = found
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.precision.load_state_dict(state.get("scaler"))
        self.start_epoch, self.step = state["epoch"] + 1, state["step"]
        self.best, self.best_epoch = state["best"], state.get("best_epoch", -1)
        # Commands applied before the checkpoint live in the restored state; only those
        # from the checkpoint's step on are applied again.
        self.ctx.inbox.drop_before(self.step)
        self._note(f"resumed from {path.name} (attempt {state['lineage']['attempt']}) "
                   f"at epoch {self.start_epoch} (step {self.step})")

    def _note(self, text: str) -> None:
        log.info("%s", text)
        if self.dist.is_main:
            self.ctx.on_note(text)
