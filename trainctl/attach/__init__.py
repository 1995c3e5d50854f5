"""The attach SDK: any training loop becomes a steerable experiment.

    run = trainctl.init(name="mine", config=cfg)
    run.attach(optimizer, scheduler)
    for batch in loader:
        run.step(); ...; run.log(loss=loss)
    run.finish()

See docs/attach.md.
"""
from trainctl.attach.run import Run, init
from trainctl.attach.steer import Knob, Steering

__all__ = ["Run", "init", "Knob", "Steering"]
