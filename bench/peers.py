"""The attach SDK against the trackers users have (issue 12), on one user loop, in lockstep.

    python bench/peers.py                 # ~3-5 min on a 2-core box
    python bench/peers.py --arms trainctl,tensorboard --steps 3000 --skip-ack --skip-outage
    python bench/peers.py --arms trainctl,trainctl:0.2 --ack-arms trainctl,trainctl:0.2:0 --outage-rounds 2

One loop: an MLP 128-256-256-10 on CPU (batch 64, SGD, 1 torch thread), 4 scalars a step
(loss, acc, grad_norm, lr); each arm (bare, trainctl SDK, TensorBoard SummaryWriter,
MLflow SQLite synchronous and `synchronous=False`, W&B offline) is its own process,
bench/_peer_arms.py. A peer that is not installed is skipped with a line saying so.

Lockstep. On this box the same bare loop moves by +-30 % from one few-second stretch to
the next, so arms run one after another cannot be compared at 1 %. Here every arm's
process is started and set up first (model built, tool initialised, trainctl attached to
its own server with one watcher, 200 untimed warm-up steps); then the arms run the same
loop in slices of S steps, one arm at a time, a cycle giving each arm one slice in an
order that changes every cycle (each block of n cycles is one shuffled order rotated n
times: every arm takes every place once per block, after varying arms). Drift slower
than a cycle then hits every arm alike. At the end each tool's final flush (finish /
close / end_run) is timed, one arm at a time. Per arm: steps/s = steps / (its slices'
time + its flush); the ratio to bare per cycle (bare's slice time / the arm's): median,
95 % bootstrap interval; the overall ratio (bare's total / the arm's, flush included);
process CPU per step over the whole lockstep (all threads, flush included; idle ticking
while other arms ran counts too) and the loop thread's alone; helper CPU per step, over
the whole lockstep too (trainctl: its server and watcher; W&B: its service process);
"CPU ratio": bare's CPU per step / the arm's, per cycle (the slice's process CPU plus the
arm's CPU outside its slices spread per step), "incl. helpers" adds the helpers' CPU per
step; points lost (each tool's own store read back).

Fairness caveat, plainly: a tool's background threads and helper processes (trainctl's
sender thread, server and watcher; W&B's service; MLflow's async queue) keep running
while another arm's slice runs. On a box with an idle core that costs nobody; on a busy
box part of it lands on whichever arm is running: it slows the other arms' slices and
flatters the tool's own. That is why the CPU columns, "incl. helpers" above all, stay:
they charge every tool for all the work it caused, wherever it ran.

Then, trainctl only (the shared server):
- set-lr latency: a client sends `scale-lr 1.0` (no change to the LR) every 0.2 s to an
  attached run; time to the APPLIED answer, p50/p99 (target <= one step + 20 ms).
- outage, in lockstep too: a bare arm and a trainctl arm alternate slices of
  --outage-slice steps; the server is SIGKILLed 4 s in and restarted on the same database
  10 s later; per window (before the kill, server down, restarting, after) the per-pair
  ratio bare slice time / SDK slice time (pairs wholly inside the window) and both loops'
  CPU per step; then every point stored after the restart (COMPLETED, nothing undelivered).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _lockstep  # noqa: E402
from _common import Cluster, cpu_s, machine, median, table  # noqa: E402
from _lockstep import WARMUP, Watcher, ci, lockstep, order, start_arms  # noqa: E402
from _peer_trainctl import ack_latency, outage  # noqa: E402

ARMS = ["bare", "trainctl", "tensorboard", "mlflow", "mlflow-async", "wandb"]
NEEDS = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "mlflow-async": "mlflow", "wandb": "wandb"}


def available(arm: str) -> str:
    mod = NEEDS.get(arm)
    if not mod:
        return ""
    import importlib.util
    try:
        return "" if importlib.util.find_spec(mod) is not None else f"{mod} is not installed"
    except ModuleNotFoundError:
        return f"{mod.split('.')[0]} is not installed"


# ---------------------------------------------------------------------- peers
def peers(steps: int, slice_n: int, wanted: list[str], dump: str = "") -> None:
    names = [a for a in wanted if not available(a)]
    for a in wanted:
        if available(a):
            print(f"skipped {a}: {available(a)}", flush=True)
    clusters: dict = {}
    arms: dict = {}
    watchers: dict = {}
    try:
        for a in names:  # each trainctl arm its own server, so its helper CPU is its own
            if a.startswith("trainctl"):
                clusters[a] = Cluster()
        start_arms(arms, names, lambda a: clusters[a].address if a in clusters else "")
        run_ids = {a: arms[a].reply(600)["run_id"] for a in names}
        for a in clusters:
            watchers[a] = Watcher(clusters[a].address, run_ids[a])
        for a in names:
            arms[a].ask(f"run {WARMUP // 2}")
        warm = {a: arms[a].ask(f"run {WARMUP - WARMUP // 2}") for a in names}
        if not slice_n:  # ~0.35 s of the bare loop, in 50s
            slice_n = max(50, int(round(0.35 * (WARMUP - WARMUP // 2) / warm["bare"]["t"] / 50)) * 50)
        cycles = max(2, math.ceil(steps / slice_n))
        print(f"lockstep: {len(names)} arms, {cycles} cycles x {slice_n} steps (bare warm-up "
              f"{(WARMUP - WARMUP // 2) / warm['bare']['t']:.0f} steps/s)", flush=True)
        mark = {a: arms[a].ask("mark") for a in names}
        h0 = {a: cpu_s(clusters[a].server.pid) + watchers[a].cpu() for a in clusters}
        got = lockstep(arms, slice_n, cycles, t0=time.perf_counter())
        fin, helper, seen = {}, {}, {}
        for a in order(names, cycles):  # flushes one at a time
            fin[a] = arms[a].ask("finish", timeout=600)
            helper[a] = fin[a]["helper_cpu"] - mark[a]["helper_cpu"]
            if a in clusters:
                w, w_cpu = watchers[a].finish()
                helper[a] += cpu_s(clusters[a].server.pid) + w_cpu - h0[a]
                with clusters[a].client() as c:
                    fin[a]["points"] = sum(len(s["step"]) for s in c.metrics(run_ids[a]).values())
                seen[a] = f"{w['n']} rows, in order: {w['in_order']}"
    finally:
        for close in [*(a.close for a in arms.values()), *(w.close for w in watchers.values()),
                      *(c.stop for c in clusters.values())]:
            try:
                close()
            except Exception as exc:  # keep closing the rest
                print(f"peers: while closing: {exc!r}", file=sys.stderr)
    if dump:  # every slice's answer, for a second look at the noise
        Path(dump).write_text(json.dumps({"slice": slice_n, "cycles": got, "finish": fin, "mark": mark}))
    _peers_table(names, got, fin, mark, helper, seen, slice_n, cycles)


def _peers_table(names, got, fin, mark, helper, seen, slice_n, cycles) -> None:
    n = slice_n * cycles
    tot = {a: sum(c[a]["t"] for c in got) + fin[a]["flush_s"] for a in names}
    # CPU outside the arm's slices (its background threads while others ran, the flush), per step
    bg = {a: (fin[a]["proc_cpu"] - mark[a]["proc_cpu"] - sum(c[a]["proc_cpu"] for c in got)) / n for a in names}
    cpu_c = {a: [c[a]["proc_cpu"] / slice_n + bg[a] for c in got] for a in names}
    rows = []
    for a in names:
        want = 4 * fin[a]["steps"]
        pts = fin[a].get("points")
        lost = "-" if a == "bare" else ("none" if pts == want else f"stored {pts} (want {want})")
        if a in seen:
            lost += f"; watcher {seen[a]}"
        h = helper[a] / n
        rows.append([a, f"{n / tot[a]:.0f}", f"{n / (tot[a] - fin[a]['flush_s']):.0f}",
                     ci([c["bare"]["t"] / c[a]["t"] for c in got]), f"{tot['bare'] / tot[a]:.3f}",
                     f"{1000 * (fin[a]['proc_cpu'] - mark[a]['proc_cpu']) / n:.3f}",
                     f"{1000 * sum(c[a]['thread_cpu'] for c in got) / n:.3f}",
                     f"{1000 * h:.3f}" if a != "bare" else "-",
                     ci([b / x for b, x in zip(cpu_c["bare"], cpu_c[a])]),
                     ci([b / (x + h) for b, x in zip(cpu_c["bare"], cpu_c[a])]), lost])
    print(machine())
    table(["arm", "steps/s (incl. flush)", "loop only", "ratio to bare per cycle [95 %]", "overall ratio",
           "process CPU ms/step", "loop thread CPU ms/step", "helper CPU ms/step", "CPU ratio [95 %]",
           "CPU ratio incl. helpers [95 %]", "points lost"], rows,
          title=f"peers in lockstep: MLP 128-256-256-10 CPU, {_lockstep.THREADS} torch thread(s), 4 scalars/step, "
                f"{cycles} cycles x {slice_n} steps per arm")
    bare = sorted(slice_n / c["bare"]["t"] for c in got)
    print(f"bare slices: {bare[0]:.0f} .. {bare[-1]:.0f} steps/s (median {median(bare):.0f}): the drift the "
          f"lockstep takes out; flush s: " + ", ".join(f"{a} {fin[a]['flush_s']:.3f}" for a in names))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6000, help="timed steps per arm (rounded up to whole slices)")
    p.add_argument("--slice", type=int, default=0, help="steps per slice (default: ~0.35 s of the bare loop, "
                                                        "from its warm-up)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {','.join(ARMS)} (bare is always "
                   "run); trainctl:SECONDS is the SDK with another row linger (e.g. trainctl:0.2, the old one)")
    p.add_argument("--dump", default="", help="write every slice's figures of the peers lockstep to this JSON file")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--skip-ack", action="store_true")
    p.add_argument("--skip-outage", action="store_true")
    p.add_argument("--outage-rounds", type=int, default=1)
    p.add_argument("--outage-slice", type=int, default=150, help="steps per slice in the outage lockstep")
    p.add_argument("--ack-arms", default="trainctl", help="e.g. trainctl,trainctl:0.2:0 (the old settings: "
                                                          "rows every 0.2 s, no ack hand-over)")
    p.add_argument("--ack-rounds", type=int, default=1)
    p.add_argument("--ack-steps", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads of every arm, bare included (default 1: "
                                                          "the loop on one core, the tool and server on the other)")
    args = p.parse_args()
    _lockstep.THREADS = args.threads
    wanted = ["bare"] + [a for a in dict.fromkeys(args.arms.split(",")) if a and a != "bare"]
    unknown = [a for a in wanted if a.split(":")[0] not in ARMS or (":" in a and not a.startswith("trainctl"))]
    if unknown:
        p.error(f"--arms: unknown {unknown} (known: {ARMS})")
    if not args.skip_peers:
        peers(args.steps, args.slice, wanted, args.dump)
    if args.skip_ack and args.skip_outage:
        return 0
    cluster = Cluster()
    try:
        if not args.skip_ack:
            for _ in range(args.ack_rounds):
                for arm in args.ack_arms.split(","):
                    ack_latency(cluster, args.ack_steps, arm)
        if not args.skip_outage:
            for _ in range(args.outage_rounds):
                outage(cluster, args.outage_slice)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
