"""A PyTorch Lightning callback: the Trainer's fit becomes an attached trainctl run.

    cb = TrainctlCallback(name="byol", knobs={"tau_base": (0.99, 0.9, 1.0)})
    Trainer(callbacks=[cb]).fit(model)          # in the module: cb.knob("tau_base")

- Step boundary = an optimizer step: `run.step()` runs at the first batch of each
  accumulation cycle, so a command is applied before that step's forward pass.
- The first optimizer and the scheduler Lightning built for it are attached. Lightning
  keeps calling `scheduler.step()` itself, per its interval ("step" or "epoch") and
  frequency; the SDK wraps that method, so steering keeps the schedule's shape either way.
  (The SDK steers one optimizer per run: with several, only the first is steerable.)
- Metrics: what the module logs with `on_step=True` goes in that step's row (plus `loss`
  from training_step's output if not logged under that name); what is logged per epoch
  (train epoch aggregates, validation) goes in an epoch row.
- End: normal end COMPLETED; an exception FAILED with its one-line reason; Ctrl-C (and a
  `trainctl cancel`, which also stops the Trainer) CANCELLED.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from lightning.pytorch.callbacks import Callback

from trainctl.integrations._common import KnobSpec, OwnsRun, RunOwner, one_line, scalars


class TrainctlCallback(OwnsRun, Callback):
    def __init__(self, name: Optional[str] = None, *, config: Any = None, tags=None, server: Optional[str] = None,
                 token: Optional[str] = None, knobs: Optional[Mapping[str, KnobSpec]] = None, run=None):
        self._owner = RunOwner(run, name, config, tags, server, token, knobs)
        self._new_step = True      # the next batch starts an optimizer step
        self._stepped = False      # an optimizer stepped during this batch
        self._step_keys: set = set()
        self._pending: Optional[dict] = None  # the last step's row, until its metrics are all in
        self._last: dict = {}                 # key -> the tensor last recorded (to skip repeats)
        self._cancelled = False

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        # Optimizers and schedulers exist by now (strategy setup precedes on_fit_start).
        run = self._owner.start(default_config=dict(getattr(pl_module, "hparams", {}) or {}))
        if trainer.optimizers:
            opt = trainer.optimizers[0]
            sched = next((c.scheduler for c in trainer.lr_scheduler_configs
                          if getattr(c.scheduler, "optimizer", None) is opt), None)
            run.attach(opt, sched)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._new_step:
            self._flush(trainer)  # the previous step's row, before the boundary
            self.run.step()
            self._new_step = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped:
            return  # accumulating: the optimizer step (and its row) is still to come
        self._stepped, self._new_step = False, True
        # The row is read later (_flush): the module's own on_train_batch_end, which may
        # log too, runs after this callback hook.
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self._pending = scalars({"loss": loss}) if loss is not None else {}
        if self.run.cancelled and not trainer.should_stop:
            self._cancelled = True
            trainer.should_stop = True

    def on_validation_start(self, trainer, pl_module) -> None:
        self._flush(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer)
        # Validation has run by now; step-level keys were already recorded per step.
        row = scalars(trainer.logged_metrics, skip=self._step_keys | {"epoch", "step"})
        if row:
            self.run.log_epoch(**row)

    def _flush(self, trainer) -> None:
        """The last optimizer step's row: what the module logged with on_step=True during
        that batch (a key not logged again since the previous row is left out), plus the
        training_step's loss unless the module logged a `loss` itself."""
        if self._pending is None:
            return
        row, self._pending = self._pending, None
        for k, v in _step_metrics(trainer).items():
            if k in ("epoch", "step") or self._last.get(k) is v:
                continue
            self._last[k] = v
            row.update(scalars({k: v}))
        self._step_keys.update(row)
        if row:
            self.run.log(**row)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._flush(trainer)
        if isinstance(exception, KeyboardInterrupt):
            self._owner.end("CANCELLED", "interrupted (KeyboardInterrupt)")
        else:
            self._owner.end("FAILED", one_line(exception))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # after on_exception the run is already finished (finish is idempotent)
            self._flush(trainer)
            if self._cancelled:
                self._owner.end("CANCELLED", "cancelled by a client")
            else:
                self._owner.end("COMPLETED")


def _step_metrics(trainer) -> dict:
    """What the module logged with `on_step=True` (the last value of each key) this epoch.
    Lightning's public dicts merge step and stale epoch values; the training loop's result
    collection has the step values alone (private API: if it moves, only the loss is kept)."""
    try:
        return dict(trainer.fit_loop.epoch_loop._results.metrics(True)["log"])
    except Exception:  # noqa: BLE001 — a Lightning version without it
        return {}
