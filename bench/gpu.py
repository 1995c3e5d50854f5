"""The GPU path, in one command: `python bench/gpu.py` (about 5-8 minutes on one H200).

1. Throughput: a real `trainctl worker` (with a real server) training resnet50 at batch
   256, AMP bf16, channels_last, synthetic 224 px data, vs a bare timm-style loop
   (timm's train.py habits: cudnn.benchmark, channels_last, autocast, set_to_none) on
   the same GPU, the same model, data loader and optimizer. steps/s of each over the
   same steady window (after --warmup steps); target ratio >= 0.98.
2. Host syncs per step: the engine's Trainer (the code the worker's run process runs)
   under torch.cuda.set_sync_debug_mode("warn"), every sync attributed by its stack to
   the training step, the batched metric copy (StepStats, every 16 steps) or elsewhere.
   Target: 0 per step outside the batched copy (bf16, fp32); fp16's GradScaler checks
   for overflow on the host once per step (torch's own; shown, not a target).
3. A short digits run in each precision (fp32, bf16, fp16, and bf16 + channels_last +
   compile) through the real server and worker, each ending COMPLETED.

Prints one table per part. Without a CUDA device it prints why and exits 0;
`--cpu-smoke` runs every part tiny on CPU instead (checks the script, not the GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Cluster, spec, table  # noqa: E402

PRECISIONS = {"fp32": False, "bf16": "bf16", "fp16": "fp16"}


# ---------------------------------------------------------------------- part 1: throughput
def throughput_spec(a) -> dict:
    s = spec("gpu-throughput", model=a.model, img=a.img, batch=a.batch, steps=a.warmup + a.steps)
    s["data"]["num_workers"] = a.loader_workers
    s["train"].update(amp=a.amp, channels_last=True, deterministic=False, device=a.device)
    s["schedule"] = {"name": "constant"}
    return s


def bare_loop(spec_dict: dict, warmup: int, steps: int) -> dict:
    """timm train.py's inner loop, nothing else; same model, loader and optimizer."""
    import timm
    import torch

    from trainctl.spec import parse_spec
    from trainctl.workers.engine.data import build_data

    sp = parse_spec(spec_dict, check_model=False)
    dev = torch.device(sp.train.device if sp.train.device != "auto" else "cuda")
    torch.backends.cudnn.benchmark = True
    data = build_data(sp.data, seed=0)
    model = timm.create_model(sp.model.name, num_classes=data.num_classes).to(dev)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    amp = {False: None, "bf16": torch.bfloat16, "fp16": torch.float16}[sp.train.amp]
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    it = iter(data.train)
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        x, y = next(it)
        x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    sync()
    return {"steps_per_s": steps / (time.perf_counter() - t0)}


SYNC_EVERY = 16  # the loop's batched metric copy on GPU (Trainer: StepStats sync_every)


def worker_run(cluster: Cluster, spec_dict: dict, warmup: int, steps: int, timeout: float) -> dict:
    """Submit to the real worker; steps/s from its step rows. A row's samples_per_sec is
    n / the host time since the previous step; the host runs up to SYNC_EVERY steps ahead
    of the GPU and waits at each batched copy, so only a window between two copies (whole
    periods) measures the GPU's pace: the window is cut to those."""
    import grpc

    from trainctl.v1 import trainctl_pb2 as pb
    from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
    from trainctl.wire import struct_from_dict

    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb_grpc.ExperimentsStub(ch)
        x = stub.Submit(pb.SubmitRequest(spec=struct_from_dict(spec_dict)))
        deadline = time.monotonic() + timeout
        while (x := stub.Get(pb.GetRequest(id=x.id))).state not in (pb.COMPLETED, pb.FAILED, pb.CANCELLED):
            if time.monotonic() > deadline:
                raise TimeoutError(f"experiment {x.id} still {pb.ExperimentState.Name(x.state)} after {timeout} s")
            time.sleep(0.5)
        state = pb.ExperimentState.Name(x.state)
        if x.state != pb.COMPLETED:
            return {"state": state, "message": x.message, "steps_per_s": float("nan")}
        m = stub.GetMetrics(pb.GetMetricsRequest(id=x.id, scope=pb.STEP, names=["samples_per_sec"]))
        (series,) = m.series
        every = SYNC_EVERY if spec_dict["train"].get("device") == "cuda" else 1  # CPU copies every step
        first = next(k for k in range(warmup, warmup + every) if (k + 1) % every == 0)
        periods = max((warmup + steps - 1 - first) // every, 1)
        sps = [v for st, v in zip(series.steps, series.values) if first < st <= first + periods * every and v > 0]
        batch = spec_dict["data"]["batch_size"]
        rate = len(sps) / sum(batch / v for v in sps) if sps else float("nan")
        return {"state": state, "steps_per_s": rate, "summary": dict(x.summary)}


def part_throughput(a, cluster: Cluster) -> list[list]:
    s = throughput_spec(a)
    rounds = []
    for r in range(a.rounds):  # interleaved: drift on a shared box hits both arms alike
        bare = _in_subprocess("bare", s, a)
        work = worker_run(cluster, {**s, "name": f"gpu-throughput-{r}"}, a.warmup, a.steps, a.timeout)
        rounds.append((bare["steps_per_s"], work["steps_per_s"], work.get("state")))
    rows = [[f"round {i + 1}", b, w, w / b if b else float("nan"), st] for i, (b, w, st) in enumerate(rounds)]
    ratios = sorted(w / b for b, w, _ in rounds if b)
    med = ratios[len(ratios) // 2] if ratios else float("nan")
    rows.append(["median", "", "", med, "MET" if med >= 0.98 else "gap"])
    table(["", "bare steps/s", "worker steps/s", "ratio (target >= 0.98)", "state"], rows,
          title=f"\n1. {a.model} batch {a.batch} {a.img}px amp={a.amp} channels_last, synthetic data, "
                f"{a.steps} steps after {a.warmup}")
    return rows


def _in_subprocess(part: str, spec_dict: dict, a) -> dict:
    """Each bare run in a fresh process: no allocator or cudnn cache carried over."""
    out = subprocess.run([sys.executable, __file__, "--_part", part, "--_spec", json.dumps(spec_dict),
                          "--warmup", str(a.warmup), "--steps", str(a.steps)],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=a.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{part} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- part 2: host syncs
def count_syncs(spec_dict: dict) -> dict:
    """Run the Trainer for one epoch with CUDA sync warnings on; classify each by stack."""
    import torch

    from trainctl.spec import parse_spec
    from trainctl.workers.engine.context import ListSink, TrainingContext
    from trainctl.workers.engine.loop import Trainer

    sp = parse_spec(spec_dict, check_model=False)
    trainer = Trainer(sp, TrainingContext(sink=ListSink()))
    counts = {"step": 0, "batched copy": 0, "epoch end": 0, "other": 0}
    cuda = trainer.device.type == "cuda"

    def where() -> str:
        names = {f.name for f in traceback.extract_stack()}
        if "_drain" in names:
            return "batched copy"
        if "_end_epoch" in names or "evaluate" in names:
            return "epoch end"
        if "_train_step" in names or "_apply_controls" in names or "_to_device" in names:
            return "step"
        return "other"

    old = warnings.showwarning

    def hook(message, category, *args, **kw):
        if "synchroniz" in str(message).lower():
            counts[where()] += 1
        else:
            old(message, category, *args, **kw)

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = hook
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.run()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    return {"steps": trainer.step, "counts": counts, "cuda": cuda}


def part_syncs(a) -> list[list]:
    rows = []
    for name, amp in PRECISIONS.items():
        if a.device == "cpu" and name == "fp16":
            continue
        s = spec(f"sync-{name}", model=a.sync_model, img=a.sync_img, batch=a.sync_batch, steps=a.sync_steps)
        s["train"].update(amp=amp, channels_last=True, deterministic=False, device=a.device)
        r = _in_subprocess("syncs", s, a)
        c, n = r["counts"], r["steps"]
        outside = c["step"] + c["other"]
        target = "torch's GradScaler: 1/step" if name == "fp16" else ("MET" if outside == 0 else "gap")
        rows.append([name, n, c["step"] / n, c["batched copy"] / n, c["other"] / n, c["epoch end"],
                     target if r["cuda"] else "n/a on CPU"])
    table(["precision", "steps", "syncs/step in the step", "in the batched copy", "other", "at epoch end",
           "target 0 outside the copy"], rows,
          title=f"\n2. host syncs (torch.cuda.set_sync_debug_mode), {a.sync_model} batch {a.sync_batch}")
    return rows


# ---------------------------------------------------------------------- part 3: digits runs
def part_digits(a, cluster: Cluster) -> list[list]:
    rows = []
    variants = [(n, amp, {}) for n, amp in PRECISIONS.items() if not (a.device == "cpu" and n == "fp16")]
    if not a.no_compile:
        variants.append(("bf16+channels_last+compile", "bf16", {"channels_last": True, "compile": True}))
    for name, amp, extra in variants:
        s = {"name": f"digits-{name.replace('+', '-')}", "model": {"name": "resnet10t"},
             "data": {"dataset": "digits", "batch_size": 64, "img_size": 32},
             "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
             "schedule": {"name": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-3, "min_lr": 1e-4},
             "train": {"epochs": a.digits_epochs, "seed": 1, "amp": amp, "device": a.device, **extra}}
        t = time.monotonic()
        r = worker_run(cluster, s, 0, 1 << 30, a.timeout)
        summary = r.get("summary", {})
        rows.append([name, r["state"], summary.get("val_top1", float("nan")), time.monotonic() - t,
                     "MET" if r["state"] == "COMPLETED" else r.get("message", "")[:60]])
    table(["precision", "state", "val_top1", "seconds", "target COMPLETED"], rows,
          title=f"\n3. digits, resnet10t, {a.digits_epochs} epochs, through the real server and worker")
    return rows


# ---------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "false"])
    p.add_argument("--steps", type=int, default=200, help="timed steps per arm and round")
    p.add_argument("--warmup", type=int, default=40, help="untimed steps first (cudnn autotune, allocator)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--loader-workers", type=int, default=8, help="data.num_workers of both arms")
    p.add_argument("--sync-model", default="resnet18")
    p.add_argument("--sync-img", type=int, default=64)
    p.add_argument("--sync-batch", type=int, default=64)
    p.add_argument("--sync-steps", type=int, default=48)
    p.add_argument("--digits-epochs", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile digits run")
    p.add_argument("--only", choices=["throughput", "syncs", "digits"], action="append")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny everything on CPU: checks the script itself")
    p.add_argument("--_part", help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.amp = False if a.amp == "false" else a.amp
    if a._part:  # a child process: one measurement, JSON on the last line
        s = json.loads(a._spec)
        with contextlib.redirect_stdout(sys.stderr):
            r = bare_loop(s, a.warmup, a.steps) if a._part == "bare" else count_syncs(s)
        print(json.dumps(r))
        return 0

    import torch

    a.device = "cuda"
    if a.cpu_smoke:
        a.device, a.model, a.batch, a.img, a.steps, a.warmup, a.rounds = "cpu", "resnet10t", 8, 32, 6, 2, 1
        a.loader_workers, a.sync_model, a.sync_img, a.sync_batch, a.sync_steps = 0, "resnet10t", 32, 8, 4
        a.digits_epochs, a.no_compile = 1, True
    elif not torch.cuda.is_available():
        print("bench/gpu.py: skipped: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a GPU box, or --cpu-smoke to check the script on CPU")
        return 0
    else:
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    parts = a.only or ["throughput", "syncs", "digits"]
    started = time.monotonic()
    with Cluster() as cluster:
        w = cluster.add_worker("gpu-bench", threads=int(os.environ.get("BENCH_THREADS", "4")))
        if "throughput" in parts:
            part_throughput(a, cluster)
        if "syncs" in parts:
            part_syncs(a)
        if "digits" in parts:
            part_digits(a, cluster)
        if w.popen.poll() is not None:
            print(f"worker exited early:\n{w.output()[-3000:]}", file=sys.stderr)
            return 1
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
