"""Training overhead: a bare PyTorch loop vs a trainctl worker streaming every step.

    python bench/overhead.py                 # ~6 min: resnet10t + small model, A/B interleaved
    python bench/overhead.py --steps 100000  # + a 100,000-step run of the small model for RSS

Arms, all with the same spec (model, synthetic data, batch, optimizer, cosine schedule,
seed) and the same torch thread count, each in its own long-lived process:
  bare    plain PyTorch loop (bench/_trainhost.py), no logging at all
  engine  trainctl's Trainer with a NullSink (same host process): engine cost only
  worker  a real `trainctl worker`: its run process (Trainer -> BatchingSink -> pipe) ->
          the agent (Outbox -> gRPC) -> a real `trainctl server` (SQLite) with one
          watching client (this process)
steps/s = steps in the timed window / wall time between the first and last step of the
window (warm-up steps dropped); for the worker the per-step wall_time comes from the
streamed rows themselves. Arms are interleaved (bare, worker, engine, engine, worker,
bare, ...) and the ratio is the median of per-round ratios, which cancels slow drift in
machine load. On a shared VM one arm's speed moves by +-10 % from one run to the next,
so the small model runs many short rounds and the median comes with a bootstrap 95 %
interval: a single round says little.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _common import (PRESETS, ROOT, Cluster, DEFAULT_THREADS, bootstrap_ci, cpu_s, machine, median, pct,  # noqa: E402
                     rss_kb, run_processes, spec, table, thread_env, tree_cpu_s)


class TrainHost:
    def __init__(self, threads: int):
        import os

        self.p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_trainhost.py")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
                                  env={**os.environ, **thread_env(threads)})
        hello = json.loads(self.p.stdout.readline())
        self.threads = hello["threads"]

    def run(self, mode: str, spec_dict: dict) -> dict:
        self.p.stdin.write(json.dumps({"mode": mode, "spec": spec_dict}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("train host died")
        return json.loads(line)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(30)


class Watcher(threading.Thread):
    """One watching client: records (step, wall_time, received_at) of every STEP row."""

    def __init__(self, client, exp_id: int):
        super().__init__(daemon=True)
        self.client, self.exp_id = client, exp_id
        self.rows: list[tuple[int, float, float]] = []
        self.final = None
        self.error = None

    def run(self) -> None:
        try:
            for ev in self.client.watch(self.exp_id):
                now = time.time()
                if ev.kind == "step":
                    self.rows.append((ev.step, ev.wall_time, now))
                elif ev.kind == "experiment" and ev.experiment.is_final:
                    self.final = ev.experiment
                    return
        except Exception as exc:  # reported by the caller
            self.error = exc


def run_worker_arm(client, spec_dict: dict, timeout: float = 600) -> dict:
    x = client.submit(spec_dict)
    w = Watcher(client, x.id)
    w.start()
    w.join(timeout)
    if w.error or w.final is None or w.final.state != "COMPLETED":
        raise RuntimeError(f"worker run {x.id} did not complete: {w.error or w.final}")
    steps = [r[0] for r in w.rows]
    if steps != list(range(len(steps))):
        raise RuntimeError(f"watcher saw steps out of order / with gaps in run {x.id}")
    return {"times": [r[1] for r in w.rows], "lat_ms": [(r[2] - r[1]) * 1e3 for r in w.rows]}


def rate(times: list[float], warm: int) -> float:
    t = times[warm:]
    return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else float("nan")


def compare(cluster: Cluster, host: TrainHost, worker_pid: int, label: str, preset: dict, steps: int, rounds: int,
            with_engine: bool) -> dict:
    sd = spec(f"overhead-{label}", steps=steps, **preset)
    warm = max(3, steps // 10)
    client = cluster.client()
    arms = ["bare", "worker"] + (["engine"] if with_engine else [])
    res: dict[str, list[float]] = {a: [] for a in arms}
    lat: list[float] = []
    ratios, eng_ratios, worker_eng = [], [], []
    cpu = {k: [] for k in ("bare", "engine", "worker", "server", "watcher")}  # CPU ms per step
    # One untimed warm-up of each process (allocator, timm/torch lazy init).
    host.run("bare", spec(f"warm-{label}", steps=5, **preset))
    run_worker_arm(client, spec(f"warm-{label}", steps=5, **preset))
    for r in range(rounds):
        order = arms if r % 2 == 0 else arms[::-1]  # ABC CBA: cancels linear drift
        got = {}
        for arm in order:
            if arm == "worker":
                # The worker's CPU includes its run processes (forks of its forkserver).
                c0 = (tree_cpu_s(worker_pid), cpu_s(cluster.server.pid), time.process_time())
                out = run_worker_arm(client, sd)
                c1 = (tree_cpu_s(worker_pid), cpu_s(cluster.server.pid), time.process_time())
                for k, a, b in zip(("worker", "server", "watcher"), c0, c1):
                    cpu[k].append((b - a) * 1e3 / steps)
                lat += out["lat_ms"][warm:]
            else:
                c0 = cpu_s(host.p.pid)
                out = host.run(arm, sd)
                cpu[arm].append((cpu_s(host.p.pid) - c0) * 1e3 / steps)
            got[arm] = rate(out["times"], warm)
            res[arm].append(got[arm])
        ratios.append(got["worker"] / got["bare"])
        if with_engine:
            eng_ratios.append(got["engine"] / got["bare"])
            worker_eng.append(got["worker"] / got["engine"])
        print(f"  [{label}] round {r + 1}/{rounds}: " + ", ".join(f"{a} {got[a]:.1f}" for a in arms) +
              f" steps/s; worker/bare {ratios[-1]:.3f}", flush=True)
    client.close()
    lo, hi = bootstrap_ci(ratios)
    return {"label": label, "steps": steps, "rounds": rounds, **{a: median(v) for a, v in res.items()},
            "ratio": median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "ci": (lo, hi),
            "engine_ratio": median(eng_ratios) if eng_ratios else float("nan"),
            "worker_engine": median(worker_eng) if worker_eng else float("nan"),
            "lat_p50": pct(lat, 50), "lat_p99": pct(lat, 99),
            **{f"cpu_{k}": median(v) if v else float("nan") for k, v in cpu.items()}}


def long_run(cluster: Cluster, worker_pid: int, steps: int, preset: dict) -> dict:
    per_epoch = min(steps, 2000)
    epochs = max(1, math.ceil(steps / per_epoch))
    sd = spec("overhead-long", steps=per_epoch, epochs=epochs, **preset)
    client = cluster.client()
    samples = []
    x = client.submit(sd)
    w = Watcher(client, x.id)
    w.start()
    t0 = time.time()
    shown = 0.0
    while w.is_alive():
        w.join(2.0)
        n = len(w.rows)
        # The worker = its agent + the run process training (a fork of its forkserver).
        samples.append((time.time() - t0, n, rss_kb(cluster.server.pid)[0],
                        rss_kb(worker_pid)[0] + sum(rss_kb(p)[0] for p in run_processes(worker_pid))))
        if samples[-1][0] - shown >= 60:  # a trend survives a run cut short
            shown = samples[-1][0]
            print(f"  [long run] {shown:5.0f} s  {n:7d} rows  server RSS {samples[-1][2] / 1024:6.0f} MB  "
                  f"worker RSS {samples[-1][3] / 1024:6.0f} MB", flush=True)
    if w.error or w.final is None or w.final.state != "COMPLETED":
        raise RuntimeError(f"long run did not complete: {w.error or w.final}")
    n = len(w.rows)
    # RSS once 10% of the steps are done (everything warmed up) vs at the end.
    early = next((s for s in samples if s[1] >= n * 0.1), samples[0])
    late = samples[-1]
    client.close()
    return {"steps": n, "epochs": epochs, "seconds": samples[-1][0], "server_rss_10pct_mb": early[2] / 1024,
            "server_rss_end_mb": late[2] / 1024, "server_peak_mb": rss_kb(cluster.server.pid)[1] / 1024,
            "worker_rss_10pct_mb": early[3] / 1024, "worker_rss_end_mb": late[3] / 1024,
            "worker_peak_mb": max(s[3] for s in samples) / 1024, "rate": rate(w.rows and [r[1] for r in w.rows], 100)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds for resnet10t")
    ap.add_argument("--small-rounds", type=int, default=25, help="interleaved rounds for the small model")
    ap.add_argument("--big-steps", type=int, default=30, help="timed steps per resnet10t run")
    ap.add_argument("--small-steps", type=int, default=300, help="timed steps per small-model run")
    ap.add_argument("--steps", type=int, default=0,
                    help="also run one long small-model run of this many steps and report RSS (e.g. 100000)")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads in every training process")
    ap.add_argument("--only", choices=["big", "small", "none"],
                    help="run one model only (none: no comparison, e.g. only the --steps long run)")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine-only arm")
    args = ap.parse_args()

    print(f"machine: {machine()}; torch threads per training process: {args.threads}")
    with Cluster() as cluster:
        worker = cluster.add_worker("bench-w0", threads=args.threads)
        host = TrainHost(args.threads)
        results = []
        try:
            if args.only in (None, "big"):
                results.append(compare(cluster, host, worker.pid, "resnet10t 32px b64", PRESETS["resnet10t"], args.big_steps,
                                       args.rounds, not args.no_engine))
            if args.only in (None, "small"):
                results.append(compare(cluster, host, worker.pid, "test_vit 16px b8", PRESETS["small"], args.small_steps,
                                       args.small_rounds, not args.no_engine))
            long = long_run(cluster, worker.pid, args.steps, PRESETS["small"]) if args.steps else None
        finally:
            host.close()
        if results:
            print_comparison(results)
        if long:
            print()
            table(["steps", "seconds", "steps/s", "server RSS @10% MB", "server RSS end MB", "server peak MB",
                   "worker RSS @10% MB", "worker RSS end MB", "worker peak MB"],
                  [[long["steps"], long["seconds"], long["rate"], long["server_rss_10pct_mb"],
                    long["server_rss_end_mb"], long["server_peak_mb"], long["worker_rss_10pct_mb"],
                    long["worker_rss_end_mb"], long["worker_peak_mb"]]],
                  title="Long run: memory (small model, 1 watcher)")


def print_comparison(results: list[dict]) -> None:
    print()
    table(["model", "steps", "rounds", "bare steps/s", "worker steps/s", "worker/bare (median)", "95% CI",
           "min..max", "engine/bare", "worker/engine", "stream p50 ms", "p99 ms", "target"],
          [[r["label"], r["steps"], r["rounds"], r["bare"], r["worker"], r["ratio"],
            f"{r['ci'][0]:.3f}..{r['ci'][1]:.3f}", f"{r['ratio_min']:.3f}..{r['ratio_max']:.3f}",
            r["engine_ratio"], r["worker_engine"], r["lat_p50"], r["lat_p99"],
            "MET" if r["ratio"] >= 0.99 else "gap"] for r in results],
          title="Training overhead (worker = trainctl worker streaming every step to a live server, 1 watcher)")
    print()
    table(["model", "bare", "engine", "worker", "worker - engine", "server", "watcher"],
          [[r["label"], r["cpu_bare"], r["cpu_engine"], r["cpu_worker"], r["cpu_worker"] - r["cpu_engine"],
            r["cpu_server"], r["cpu_watcher"]] for r in results],
          title="CPU ms per training step by process (whole run incl. build/eval; medians; "
                "worker - engine = streaming cost inside the worker)")


if __name__ == "__main__":
    main()
