"""A long-lived training process for the benchmarks' local arms (no trainctl network).

Reads one JSON request per stdin line, answers one JSON line on stdout:
  {"mode": "bare",   "spec": {...}}  a plain PyTorch loop (same model, data, loss,
                                      optimizer and LR schedule as the spec), no logging
  {"mode": "engine", "spec": {...}}  trainctl's real `Trainer` with a NullSink (the engine
                                      alone, no network): separates engine from streaming cost
  {"mode": "build",  "spec": {...}}  time building data + model + optimizer only
Answer: {"times": [wall time after each optimizer step], "build_s": s, "rss_kb": ...}

Kept alive between requests so imports are paid once, like a worker's.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from trainctl.spec import parse_spec
from trainctl.workers.engine.context import NullSink, TrainingContext
from trainctl.workers.engine.data import build_data
from trainctl.workers.engine.loop import Trainer, seed_everything
from trainctl.workers.engine.losses import build_loss
from trainctl.workers.engine.models import build_model
from trainctl.workers.engine.optim import build_optimizer
from trainctl.schedules import build_schedule


def bare(spec) -> dict:
    tp = spec.train
    t0 = time.perf_counter()
    seed_everything(tp.seed, tp.deterministic)
    data = build_data(spec.data, seed=tp.seed)
    model = build_model(spec.model, num_classes=data.num_classes, in_chans=data.in_chans, loss_name=spec.loss.name)
    loss_fn = build_loss(spec.loss, num_classes=data.num_classes, class_counts=data.class_counts)
    opt = build_optimizer(spec.optimizer, model)
    steps = min(len(data.train), tp.max_steps_per_epoch) if tp.max_steps_per_epoch else len(data.train)
    sched = build_schedule(spec.schedule, base_lr=spec.optimizer.lr, steps_per_epoch=steps, epochs=tp.epochs)
    build_s = time.perf_counter() - t0
    times = []
    step = 0
    model.train()
    for epoch in range(tp.epochs):
        data.set_epoch(epoch)
        loss_fn.set_epoch(epoch)
        batches = iter(data.train)
        for _ in range(steps):
            lr = sched.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            x, y = next(batches)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            if tp.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tp.clip_grad)
            opt.step()
            times.append(time.time())
            step += 1
    return {"times": times, "build_s": build_s}


class _TimingSink(NullSink):
    def __init__(self):
        self.times = []

    def log(self, scope, step, epoch, values):
        if scope == "STEP":
            self.times.append(time.time())


def engine(spec) -> dict:
    sink = _TimingSink()
    t0 = time.perf_counter()
    trainer = Trainer(spec, TrainingContext(sink=sink))
    build_s = time.perf_counter() - t0
    trainer.run()
    return {"times": sink.times, "build_s": build_s}


def build(spec) -> dict:
    t0 = time.perf_counter()
    Trainer(spec, TrainingContext())
    return {"times": [], "build_s": time.perf_counter() - t0}


def main() -> None:
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        spec = parse_spec(req["spec"], check_model=False)
        out = {"bare": bare, "engine": engine, "build": build}[req["mode"]](spec)
        with open("/proc/self/status") as fh:
            out["rss_kb"] = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
