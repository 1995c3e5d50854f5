"""A Hugging Face `TrainerCallback`: `Trainer.train()` becomes an attached trainctl run.

    trainer = Trainer(..., callbacks=[TrainctlCallback(name="tiny-bert")])

- on_train_begin: the run is registered (config = the TrainingArguments unless given) and
  the Trainer's optimizer and LR scheduler attached (unwrapped from accelerate's wrappers,
  so `set-decay` sees the real scheduler). The Trainer keeps stepping its scheduler; the
  SDK wraps that call, so steering keeps the schedule's shape.
- on_step_begin (once per optimizer step, whatever the gradient accumulation): `run.step()`.
- on_log: the logged scalars go in the current step's row (`loss`, `grad_norm`, `eval_*`
  ...); with eval_strategy "epoch" the `eval_*` values go in an epoch row. The end-of-
  training summary (train_runtime, ...) is not a step metric and is left out.
- on_train_end: COMPLETED, or CANCELLED after a `trainctl cancel` (which also stops the
  Trainer at the end of that step).
- The Trainer has no exception hook: an exception escaping `train()` is seen by the SDK's
  exit hook (FAILED with its reason; Ctrl-C CANCELLED). For that inside a larger script,
  pass `run=` from `with trainctl.init(...) as run:`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from transformers import TrainerCallback

from trainctl.integrations._common import KnobSpec, OwnsRun, RunOwner, scalars

# The end-of-training summary Trainer.train() logs once; not step metrics.
_SUMMARY = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss",
            "epoch", "step"}


def _unwrap(obj, attr: str):
    """accelerate's AcceleratedOptimizer / AcceleratedScheduler hold the torch object."""
    if obj is not None and type(obj).__module__.startswith("accelerate."):
        return getattr(obj, attr, obj)
    return obj


def _epochly(strategy) -> bool:
    return str(getattr(strategy, "value", strategy)).lower() == "epoch"  # an IntervalStrategy or its str


class TrainctlCallback(OwnsRun, TrainerCallback):
    def __init__(self, name: Optional[str] = None, *, config: Any = None, tags=None, server: Optional[str] = None,
                 token: Optional[str] = None, knobs: Optional[Mapping[str, KnobSpec]] = None, run=None):
        self._owner = RunOwner(run, name, config, tags, server, token, knobs)
        self._cancelled = False

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        run = self._owner.start(default_config=args.to_dict())
        if optimizer is not None:
            run.attach(_unwrap(optimizer, "optimizer"), _unwrap(lr_scheduler, "scheduler"))

    def on_step_begin(self, args, state, control, **kwargs):
        self.run.step()

    def on_step_end(self, args, state, control, **kwargs):
        if self.run.cancelled and not control.should_training_stop:
            self._cancelled = True
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is None or not logs or "train_runtime" in logs:
            return
        row = scalars(logs, skip=_SUMMARY)
        evals = {k: v for k, v in row.items() if k.startswith("eval_")}
        if evals and _epochly(getattr(args, "eval_strategy", "")):
            self.run.log_epoch(**evals)
            row = {k: v for k, v in row.items() if k not in evals}
        if row:
            self.run.log(**row)

    def on_train_end(self, args, state, control, **kwargs):
        if self._cancelled:
            self._owner.end("CANCELLED", "cancelled by a client")
        else:
            self._owner.end("COMPLETED")
