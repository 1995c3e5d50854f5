"""The attach SDK against the trackers users have (issue 12), on one user loop.

    python bench/peers.py                 # ~6-10 min on a 2-core box
    python bench/peers.py --rounds 3 --steps 1000 --skip-outage
    python bench/peers.py --arms bare,trainctl,tensorboard --skip-ack --skip-outage
    python bench/peers.py --arms trainctl,trainctl:0.2,tensorboard --ack-arms trainctl,trainctl:0.2:0 \
        --ack-rounds 2 --ack-steps 10000 --outage-rounds 2     # new vs old SDK settings, same rounds

Each arm runs in a fresh process, bench/_peer_arms.py (the loop and each tool's calls).

One loop: an MLP 128-256-256-10 on CPU (batch 64, SGD, 1 torch thread), 4 scalars a
step (loss, acc, grad_norm, lr). Each arm runs in a fresh process (a tool's threads and
helper processes never leak into the next arm), arms interleaved round by round in a
rotating order; the timed window is the loop PLUS the tool's final flush (an
asynchronous logger's drain is part of what the user waits for). Figures: steps/s, the
ratio to the bare arm of the same round (median over rounds, 95 % bootstrap interval),
the loop process's CPU per step (all its threads) and the loop thread's alone, CPU per
step of any helper process the tool starts (its descendants; for trainctl: the server
and the one watcher), and whether every point arrived (read back from each tool's own
store). On a shared box the CPU figures move far less than steps/s: "CPU ratio" is
bare CPU / the arm's CPU, and "incl. helpers" adds the helpers' CPU to the arm's (what
the tool costs a box whose every core is busy). Peers: TensorBoard SummaryWriter, MLflow (SQLite store,
synchronous, and `log_metrics(..., synchronous=False)`), W&B offline. A peer that is not
installed is skipped with a line saying so.

Then, trainctl only:
- set-lr latency: a client sends `scale-lr 1.0` (no change to the LR) every 0.2 s to an
  attached run; time to the APPLIED answer, p50/p99 (target <= one step + 20 ms).
- outage: the server is SIGKILLed 4 s into a run and restarted 10 s later; the loop's
  steps/s in that window vs bare runs just before and just after (target >= 0.99), and
  every point stored after the restart.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Cluster, Proc, bootstrap_ci, machine, median, pct, table, thread_env, wait_healthy  # noqa: E402

ARMS = ["bare", "trainctl", "tensorboard", "mlflow", "mlflow-async", "wandb"]
THREADS = 1  # torch intra-op threads of every arm (--threads)
NEEDS = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "mlflow-async": "mlflow", "wandb": "wandb"}


# ---------------------------------------------------------------------- the parent
class Arm:
    """One arm in a fresh process (bench/_peer_arms.py)."""

    def __init__(self, arm: str, steps: int, address: str):
        self.tmp = Path(tempfile.mkdtemp(prefix=f"peers-{arm}-"))
        env = {**os.environ, **thread_env(THREADS), "PYTHONPATH": str(ROOT)}
        self.p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_peer_arms.py"), arm, "--steps", str(steps),
                                   "--address", address, "--tmp", str(self.tmp)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))

    def first_line(self) -> dict:
        return json.loads(self.p.stdout.readline())

    def go(self) -> None:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def result(self, timeout: float = 900) -> dict:
        out, _ = self.p.communicate(timeout=timeout)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if self.p.returncode != 0 or not lines:
            raise RuntimeError(f"arm failed (rc {self.p.returncode}): {out[-2000:]}")
        return json.loads(lines[-1])


def _proc_cpu(pid: int) -> float:
    import psutil
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def run_trainctl(cluster: Cluster, steps: int, pinger=None, arm: str = "trainctl") -> dict:
    """One trainctl arm: the child attaches, a watcher (its own process) watches, go."""
    a = Arm(arm, steps, cluster.address)
    run_id = a.first_line()["run_id"]
    watcher = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_watchers.py"), cluster.address, str(run_id),
                                "1", "0"], stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert json.loads(watcher.stdout.readline())["ready"]
    cpu0 = _proc_cpu(cluster.server.pid)
    w_cpu0 = _proc_cpu(watcher.pid)  # its start-up (imports) is not the loop's cost
    stop = threading.Event()
    th = None
    if pinger is not None:
        th = threading.Thread(target=pinger, args=(run_id, stop), daemon=True)
        th.start()
    a.go()
    res = a.result()
    stop.set()
    if th is not None:
        th.join()
    w_out = watcher.stdout.read()
    _, _, ru = os.wait4(watcher.pid, 0)  # its own rusage: CPU of the whole watcher process
    watcher.returncode = 0
    res["helper_cpu_s"] += _proc_cpu(cluster.server.pid) - cpu0 + ru.ru_utime + ru.ru_stime - w_cpu0
    got = json.loads(w_out.splitlines()[-1])["watchers"][0]
    with cluster.client() as c:
        stored = c.metrics(run_id)
    res["points"] = sum(len(s["step"]) for s in stored.values())
    res["watcher"] = f"{got['n']} rows, in order: {got['in_order']}"
    return res


def available(arm: str) -> str:
    mod = NEEDS.get(arm)
    if not mod:
        return ""
    import importlib.util
    try:
        return "" if importlib.util.find_spec(mod) is not None else f"{mod} is not installed"
    except ModuleNotFoundError:
        return f"{mod.split('.')[0]} is not installed"


def peers(cluster: Cluster, rounds: int, steps: int, wanted: list[str]) -> None:
    arms = [a for a in wanted if not available(a)]
    for a in wanted:
        if available(a):
            print(f"skipped {a}: {available(a)}", flush=True)
    got: dict = {a: [] for a in arms}
    for r in range(rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for a in order:
            res = run_trainctl(cluster, steps, arm=a) if a.startswith("trainctl") else \
                Arm(a, steps, cluster.address).result()
            got[a].append(res)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{a} {got[a][-1]['sps']:.0f}" for a in arms), flush=True)
    rows = []
    for a in arms:
        ratios = [x["sps"] / b["sps"] for x, b in zip(got[a], got["bare"])]
        lo, hi = bootstrap_ci(ratios)
        pts = [x.get("points") for x in got[a]]
        want = 4 * steps
        lost = "-" if a == "bare" else ("none" if all(p == want for p in pts) else f"stored {pts} (want {want} each)")
        cpu = [x.get("cpu_ms_step", math.nan) for x in got[a]]
        helper = [1000 * x["helper_cpu_s"] / steps for x in got[a]]
        cr = [b.get("cpu_ms_step", math.nan) / x for x, b in zip(cpu, got["bare"])]
        ch = [b.get("cpu_ms_step", math.nan) / (x + h) for x, h, b in zip(cpu, helper, got["bare"])]
        rows.append([a, f"{median([x['sps'] for x in got[a]]):.0f}", f"{median([x['loop_sps'] for x in got[a]]):.0f}",
                     _ci(ratios), f"{median(cpu):.3f}",
                     f"{median([x.get('loop_thread_cpu_ms_step', math.nan) for x in got[a]]):.3f}",
                     f"{median(helper):.3f}" if a != "bare" else "-", _ci(cr), _ci(ch), lost])
    print(machine())
    table(["arm", "steps/s (incl. flush)", "loop only", "ratio to bare [95 %]", "process CPU ms/step",
           "loop thread CPU ms/step", "helper CPU ms/step", "CPU ratio [95 %]", "CPU ratio incl. helpers [95 %]",
           "points lost"], rows, title=f"peers: MLP 128-256-256-10 CPU, {THREADS} torch thread(s), 4 scalars/step, "
                                        f"{rounds} interleaved rounds x {steps} steps")
    print("rounds, steps/s: " + "; ".join(f"{a} " + " ".join(f"{x['sps']:.0f}" for x in got[a]) for a in arms))
    for a in arms:
        if a.startswith("trainctl"):
            print(f"{a} watcher:", "; ".join(x["watcher"] for x in got[a]))


def _ci(xs: list) -> str:
    lo, hi = bootstrap_ci(xs)
    return f"{median(xs):.3f} [{lo:.3f}, {hi:.3f}]"


def ack_latency(cluster: Cluster, steps: int, arm: str = "trainctl") -> None:
    from trainctl.client import Client
    lat: list = []
    # Segments from the server's own stamps (same clock): the client's request until the
    # server stored it; stored until the run's ack was stored (push, the loop's next step,
    # the ack back); until the client has the answer.
    seg: dict = {"client -> stored": [], "stored -> ack stored (push, step, ack)": [], "ack stored -> client": []}

    def pinger(run_id, stop):
        with Client(cluster.address) as c:
            while not stop.is_set():
                t0, w0 = time.perf_counter(), time.time()
                try:
                    r = c.scale_lr(run_id, 1.0, wait=10)
                    if r.status == "APPLIED":
                        lat.append(time.perf_counter() - t0)
                        w1 = time.time()
                        for k, v in zip(seg, (r.requested_at - w0, r.applied_at - r.requested_at, w1 - r.applied_at)):
                            seg[k].append(v)
                except Exception:
                    pass
                stop.wait(0.2)

    res = run_trainctl(cluster, steps, pinger, arm=arm)
    lat.sort()
    step_ms = 1000 / res["loop_sps"]

    def p50_99(xs):
        xs = sorted(xs)
        return f"{1000 * pct(xs, 50):.1f} / {1000 * pct(xs, 99):.1f} ms" if xs else "-"
    table(["measure", "value"], [
        ["scale-lr acked p50 / p99", f"{p50_99(lat)} (n={len(lat)}; max {1000 * max(lat or [math.nan]):.1f} ms)"],
        ["one step", f"{step_ms:.2f} ms; target p99 <= {step_ms + 20:.1f} ms"],
        *[[f"  {k} p50 / p99", p50_99(v)] for k, v in seg.items()],
    ], title=f"set-lr (scale-lr 1.0 every 0.2 s) on an attached run ({arm}), one watcher")


def outage(cluster: Cluster, steps: int, kill_at: float, down: float) -> None:
    bare_before = Arm("bare", steps // 3, cluster.address).result()
    a = Arm("trainctl", steps, cluster.address)
    run_id = a.first_line()["run_id"]
    a.go()
    t_go = time.perf_counter()
    time.sleep(kill_at)
    os.kill(cluster.server.pid, signal.SIGKILL)
    cluster.server.popen.wait()
    t_kill = time.perf_counter() - t_go
    time.sleep(down)
    t_spawn = time.perf_counter() - t_go
    cluster.server = Proc(["server", "--listen", cluster.address, "--db", f"sqlite:///{cluster.db_path}"],
                          cluster.tmp / "server2.log")
    wait_healthy(cluster.address, cluster.server)
    t_up = time.perf_counter() - t_go
    res = a.result()
    bare_after = Arm("bare", steps // 3, cluster.address).result()

    def window_sps(stamps, lo, hi):
        n = sum(1 for s in stamps if lo <= s < hi)
        return n / (hi - lo)

    # The child's clock starts a little after "go" (tens of ms; negligible next to 10 s).
    def window_cpu(cpu_stamps, lo, hi):  # process CPU ms per step between the stamps inside [lo, hi)
        inside = [c for c in cpu_stamps if lo <= c[1] < hi]
        if len(inside) < 2:
            return math.nan
        return 1000 * (inside[-1][2] - inside[0][2]) / (inside[-1][0] - inside[0][0])

    sdk_w = window_sps(res["stamps"], t_kill, t_spawn)  # the server dead (its restart: next line)
    cpu_w = window_cpu(res["cpu_stamps"], t_kill, t_spawn)
    cpu_bare = (bare_before["cpu_ms_step"] + bare_after["cpu_ms_step"]) / 2
    sdk_r = window_sps(res["stamps"], t_spawn, t_up)
    # Bare runs just before and just after (whole loop), averaged: the box drifts.
    bare_b, bare_a = bare_before["loop_sps"], bare_after["loop_sps"]
    bare_w = (bare_b + bare_a) / 2
    with cluster.client() as c:
        x = c.get(run_id)
        stored = c.metrics(run_id)
    pts = sum(len(s["step"]) for s in stored.values())
    table(["measure", "value"], [
        ["server down", f"{t_kill:.1f} s .. {t_spawn:.1f} s after go (SIGKILL), restarting on the same file "
                        f"until {t_up:.1f} s"],
        ["loop steps/s while down", f"{sdk_w:.0f} (bare runs just before / after: {bare_b:.0f} / {bare_a:.0f}); "
                                    f"ratio {sdk_w / bare_w:.3f} (vs before {sdk_w / bare_b:.3f}, after "
                                    f"{sdk_w / bare_a:.3f})"],
        ["loop process CPU while down", f"{cpu_w:.3f} ms/step (bare runs: {bare_before['cpu_ms_step']:.3f} / "
                                        f"{bare_after['cpu_ms_step']:.3f}); CPU ratio bare/SDK {cpu_bare / cpu_w:.3f}"],
        ["loop steps/s before the kill", f"{window_sps(res['stamps'], 0.5, t_kill):.0f} (server and watcher up)"],
        ["loop steps/s while it restarts", f"{sdk_r:.0f}; ratio {sdk_r / bare_w:.3f} (the new server's start "
                                           "shares the 2 cores)"],
        ["points stored after restart", f"{pts} of {4 * steps} ({'none lost' if pts == 4 * steps else 'LOST'})"],
        ["run state / undelivered", f"{x.state} / {'; '.join(res.get('undelivered') or []) or 'nothing'}"],
    ], title="server killed mid-run")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {','.join(ARMS)} (bare is always "
                   "run); trainctl:SECONDS is the SDK with another row linger (e.g. trainctl:0.2, the old one)")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--skip-ack", action="store_true")
    p.add_argument("--skip-outage", action="store_true")
    p.add_argument("--outage-rounds", type=int, default=1)
    p.add_argument("--ack-arms", default="trainctl", help="e.g. trainctl,trainctl:0.2:0 (the old settings: "
                                                          "rows every 0.2 s, no ack hand-over)")
    p.add_argument("--ack-rounds", type=int, default=1)
    p.add_argument("--ack-steps", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads of every arm, bare included (default 1: "
                                                          "the loop on one core, the tool and server on the other)")
    args = p.parse_args()
    global THREADS
    THREADS = args.threads
    wanted = ["bare"] + [a for a in args.arms.split(",") if a and a != "bare"]
    unknown = [a for a in wanted if a.split(":")[0] not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown} (known: {ARMS})")
    cluster = Cluster()
    try:
        if not args.skip_peers:
            peers(cluster, args.rounds, args.steps, wanted)
        if not args.skip_ack:
            for _ in range(args.ack_rounds):
                for arm in args.ack_arms.split(","):
                    ack_latency(cluster, args.ack_steps, arm)
        if not args.skip_outage:
            for _ in range(args.outage_rounds):
                outage(cluster, 20_000, kill_at=4.0, down=10.0)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
