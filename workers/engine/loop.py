"""The training loop: one experiment spec in, metrics out, steerable at every step.

It talks only to a `TrainingContext` (metrics sink + control inbox), so it runs the
same inside the worker agent, in tests and in `replay`.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from trainctl.spec import Spec
from trainctl.workers.engine.checkpoint import load_checkpoint, save_checkpoint
from trainctl.workers.engine.context import EPOCH, STEP, TrainingContext
from trainctl.workers.engine.control import ControlTargets, apply_command
from trainctl.workers.engine.data import build_data
from trainctl.workers.engine.losses import build_loss
from trainctl.workers.engine.models import build_model
from trainctl.workers.engine.optim import build_optimizer
from trainctl.workers.engine.schedulers import build_schedule
from trainctl.workers.engine.stepstats import StepStats

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is what users see as the failure reason."""


class Cancelled(Exception):
    pass


@dataclass
class Summary:
    val_top1: float
    best_val_top1: float
    val_loss: float
    train_loss: float
    steps: int
    epochs: int
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device: 'cuda' requested but no CUDA device is visible")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    def __init__(self, spec: Spec, ctx: Optional[TrainingContext] = None):
        self.spec = spec
        self.ctx = ctx or TrainingContext()
        tp = spec.train
        seed_everything(tp.seed, tp.deterministic)
        self.device = pick_device(tp.device)
        self.data = build_data(spec.data, seed=tp.seed)
        self.model = build_model(spec.model, num_classes=self.data.num_classes, in_chans=self.data.in_chans,
                                 loss_name=spec.loss.name).to(self.device)
        if tp.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(spec.loss, num_classes=self.data.num_classes,
                                  class_counts=self.data.class_counts).to(self.device)
        self.optimizer = build_optimizer(spec.optimizer, self.model)
        batches = len(self.data.train) // tp.grad_accum
        self.steps_per_epoch = min(batches, tp.max_steps_per_epoch) if tp.max_steps_per_epoch else batches
        if self.steps_per_epoch < 1:
            raise TrainingError(f"data.batch_size: {spec.data.batch_size} x train.grad_accum {tp.grad_accum} "
                                f"leaves no full optimizer step in an epoch of {len(self.data.train)} batches")
        self.schedule = build_schedule(spec.schedule, base_lr=spec.optimizer.lr,
                                       steps_per_epoch=self.steps_per_epoch, epochs=tp.epochs)
        self.ema = self._build_ema()
        self.mixup = self._build_mixup()
        self.amp_dtype = {True: torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(tp.amp)
        use_scaler = self.amp_dtype is torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.targets = ControlTargets(self.schedule, self.optimizer, self.ema)
        # Stepping on GPU must not wait for the device: values stay on device and are
        # copied out in batches (every step on CPU, where a copy costs nothing).
        self.stats = StepStats(self.ctx.sink, sync_every=1 if self.device.type == "cpu" else 16)
        self.start_epoch, self.step, self.best = 0, 0, 0.0

    # ------------------------------------------------------------------ setup helpers
    def _build_ema(self):
        ema = self.spec.train.ema
        if ema is None:
            return None
        from timm.utils import ModelEmaV3

        return ModelEmaV3(self.model, decay=ema.decay, use_warmup=ema.warmup, device=self.device)

    def _build_mixup(self):
        mp = self.spec.train.mixup
        if mp is None:
            return None
        from timm.data import Mixup

        return Mixup(mixup_alpha=mp.mixup_alpha, cutmix_alpha=mp.cutmix_alpha, prob=mp.prob,
                     switch_prob=mp.switch_prob, label_smoothing=mp.label_smoothing,
                     num_classes=self.data.num_classes)

    # ------------------------------------------------------------------ the run
    def run(self) -> Summary:
        started = time.time()
        tp = self.spec.train
        self._maybe_resume()
        val = {"val_top1": 0.0, "val_loss": math.nan}
        train_loss = math.nan
        last_progress = 0.0
        for epoch in range(self.start_epoch, tp.epochs):
            # Batch order is a pure function of (seed, epoch): what makes resume exact.
            self.data.set_epoch(epoch)
            self.loss_fn.set_epoch(epoch)
            self.model.train()
            t_epoch = time.perf_counter()
            batches = iter(self.data.train)
            for i in range(self.steps_per_epoch):
                self._apply_controls()
                lr = self.schedule.lr_at(self.step)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                loss, correct, n = self._train_step(batches, epoch)
                self.stats.add(self.step, epoch, lr, loss, correct, n)
                self.step += 1
                now = time.monotonic()
                if now - last_progress > 0.5:
                    last_progress = now
                    self.ctx.on_progress(self.step)
            sums = self.stats.flush()
            self._check_finite(sums)
            train_loss = sums.loss_sum / max(sums.seen, 1)
            val = self.evaluate(self.model)
            row = {"train_loss": train_loss, "train_acc": sums.correct / max(sums.seen, 1),
                   **val, "epoch_time": time.perf_counter() - t_epoch, "lr": self.schedule.lr_at(self.step - 1)}
            if self.ema is not None:
                ema_val = self.evaluate(self.ema.module)
                row.update({"ema_val_top1": ema_val["val_top1"], "ema_val_loss": ema_val["val_loss"]})
            self.best = max(self.best, val["val_top1"])
            row["best_val_top1"] = self.best
            self.schedule.on_epoch_end(epoch, row)
            self.ctx.sink.log(EPOCH, self.step, epoch, row)
            self.ctx.sink.flush()
            if self.ctx.checkpoint_dir and tp.checkpoint_every and (epoch + 1) % tp.checkpoint_every == 0:
                self._save(epoch)
        return Summary(val_top1=val["val_top1"], best_val_top1=self.best, val_loss=val["val_loss"],
                       train_loss=train_loss, steps=self.step, epochs=tp.epochs,
                       seconds=time.time() - started)

    def _apply_controls(self) -> None:
        if self.ctx.inbox.cancelled:
            raise Cancelled(self.ctx.inbox.cancel_reason)
        for cmd in self.ctx.inbox.due(self.step):
            self.ctx.inbox.ack(apply_command(cmd, self.step, self.targets))

    def _train_step(self, batches, epoch: int):
        tp = self.spec.train
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        n = 0
        for _ in range(tp.grad_accum):
            x, y = next(batches)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if tp.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            target = y
            if self.mixup is not None and (tp.mixup.off_epoch is None or epoch < tp.mixup.off_epoch) \
                    and x.shape[0] % 2 == 0:
                x, target = self.mixup(x, y)
            with self._autocast():
                logits = self.model(x)
                loss = self.loss_fn(logits, target) / tp.grad_accum
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            total_loss += loss.detach() * tp.grad_accum * x.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
            n += x.shape[0]
        if tp.on_nonfinite == "skip" and not torch.isfinite(total_loss):
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self._clip_and_step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return total_loss, correct, n

    def _clip_and_step(self) -> None:
        tp = self.spec.train
        if tp.clip_grad is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            params = self.model.parameters()
            if tp.clip_mode == "norm":
                torch.nn.utils.clip_grad_norm_(params, tp.clip_grad)
            elif tp.clip_mode == "value":
                torch.nn.utils.clip_grad_value_(params, tp.clip_grad)
            else:
                from timm.utils import adaptive_clip_grad

                adaptive_clip_grad(params, tp.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _check_finite(self, sums) -> None:
        if sums.first_nonfinite_step is not None and self.spec.train.on_nonfinite == "fail":
            raise TrainingError(f"non-finite loss at step {sums.first_nonfinite_step}")

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        loss_sum = torch.zeros((), device=self.device)
        confusion = torch.zeros(self.data.num_classes, self.data.num_classes, dtype=torch.long, device=self.device)
        for x, y in self.data.val:
            x, y = x.to(self.device), y.to(self.device)
            if self.spec.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            idx = y * self.data.num_classes + logits.argmax(1)
            confusion += torch.bincount(idx, minlength=self.data.num_classes ** 2).view_as(confusion)
        confusion = confusion.cpu()
        seen = int(confusion.sum())
        per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
        out = {"val_loss": float(loss_sum) / max(seen, 1),
               "val_top1": float(confusion.diag().sum()) / max(seen, 1),
               "val_balanced_acc": float(per_class.mean())}
        model.train()
        return out

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_path(self) -> Optional[Path]:
        return Path(self.ctx.checkpoint_dir) / "last.pt" if self.ctx.checkpoint_dir else None

    def _save(self, epoch: int) -> None:
        save_checkpoint(self._checkpoint_path(), epoch=epoch, step=self.step, best=self.best, model=self.model,
                        optimizer=self.optimizer, schedule=self.schedule, ema=self.ema, scaler=self.scaler)

    def _maybe_resume(self) -> None:
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
                                ema=self.ema, scaler=self.scaler)
        self.start_epoch, self.step, self.best = state["epoch"] + 1, state["step"], state["best"]
        # Commands applied before the checkpoint live in the restored schedule/optimizer
        # state; only those from the checkpoint's step on are applied again.
        self.ctx.inbox.drop_before(self.step)
        log.info("resumed from %s at epoch %d (step %d)", path, self.start_epoch, self.step)
