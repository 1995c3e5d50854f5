"""The attach SDK: any training loop becomes a steerable experiment.

    run = trainctl.init(name="mine", config=cfg)
    run.attach(optimizer, scheduler)
    for batch in loader:
        run.step(); ...; run.log(loss=loss)
    run.finish()

Inside a command submitted as code (`trainctl submit job.yaml --code DIR`), the worker
sets TRAINCTL_SERVER/TRAINCTL_TOKEN/TRAINCTL_EXPERIMENT_ID to its local endpoint, so
`trainctl.init()` (no name needed) joins that experiment and attempt.

See docs/attach.md.
"""
import os

from trainctl.attach import run as _run
from trainctl.attach.run import Run
from trainctl.attach.steer import Knob, Steering


def init(name=None, config=None, tags=None, server=None, token=None, replay=0, spill_dir=None,
         replay_wait=60.0, sync_every=_run.DEFAULT_EVERY) -> Run:
    if name is None:  # a submitted command: the experiment is named by its job
        name = os.environ.get("TRAINCTL_RUN_NAME") or (
            f"experiment-{os.environ['TRAINCTL_EXPERIMENT_ID']}" if os.environ.get("TRAINCTL_EXPERIMENT_ID") else None)
        if name is None:
            raise ValueError("name: required (only a command submitted as code may leave it out)")
    return _run.init(name, config=config, tags=tags, server=server, token=token, replay=replay, spill_dir=spill_dir,
                     replay_wait=replay_wait, sync_every=sync_every)


init.__doc__ = _run.init.__doc__

__all__ = ["Run", "init", "Knob", "Steering"]
