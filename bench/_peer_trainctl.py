"""The trainctl-only parts of bench/peers.py, on one shared server: set-lr latency on an
attached run, and the server killed mid-run with bare and SDK loops in lockstep."""
from __future__ import annotations

import math
import os
import signal
import threading
import time

import _lockstep
from _common import Cluster, Proc, machine, pct, table, thread_env, wait_healthy
from _lockstep import WARMUP, Watcher, ci, lockstep, start_arms
from _peer_arms import ArmProcess


def ack_latency(cluster: Cluster, steps: int, arm: str = "trainctl") -> None:
    from trainctl.client import Client
    lat: list = []
    # Segments from the server's own stamps (same clock): the client's request until the
    # server stored it; stored until the run's ack was stored (push, the loop's next step,
    # the ack back); until the client has the answer.
    seg: dict = {"client -> stored": [], "stored -> ack stored (push, step, ack)": [], "ack stored -> client": []}

    def pinger(run_id, stop):
        stop.wait(0.5)  # the loop starts with the "run" below: a command sent before would wait for it
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

    a = ArmProcess(arm, cluster.address, thread_env(_lockstep.THREADS))
    w = th = None
    stop = threading.Event()
    try:
        run_id = a.reply(600)["run_id"]
        w = Watcher(cluster.address, run_id)
        th = threading.Thread(target=pinger, args=(run_id, stop), daemon=True)
        th.start()
        loop_sps = steps / a.ask(f"run {steps}", timeout=900)["t"]
        stop.set()
        th.join()
        a.ask("finish", timeout=600)
    finally:
        stop.set()
        a.close()
        if w is not None:
            w.close()
    step_ms = 1000 / loop_sps

    def p50_99(xs):
        xs = sorted(xs)
        return f"{1000 * pct(xs, 50):.1f} / {1000 * pct(xs, 99):.1f} ms" if xs else "-"
    table(["measure", "value"], [
        ["scale-lr acked p50 / p99", f"{p50_99(lat)} (n={len(lat)}; max {1000 * max(lat or [math.nan]):.1f} ms)"],
        ["one step", f"{step_ms:.2f} ms; target p99 <= {step_ms + 20:.1f} ms"],
        *[[f"  {k} p50 / p99", p50_99(v)] for k, v in seg.items()],
    ], title=f"set-lr (scale-lr 1.0 every 0.2 s) on an attached run ({arm}), one watcher")


# ---------------------------------------------------------------------- outage
class _Killer(threading.Thread):
    """SIGKILLs the cluster's server at t0 + kill_at and starts a new one on the same
    database `down` seconds later; times since t0 in .times, an error in .error."""

    def __init__(self, cluster: Cluster, t0: float, kill_at: float, down: float):
        super().__init__(daemon=True)
        self.cluster, self.t0, self.kill_at, self.down = cluster, t0, kill_at, down
        self.times: dict = {}
        self.error = None
        self.cancel = threading.Event()

    def run(self):
        try:
            c = self.cluster
            if self.cancel.wait(self.kill_at):
                return
            os.kill(c.server.pid, signal.SIGKILL)
            c.server.popen.wait()
            self.times["kill"] = time.perf_counter() - self.t0
            if self.cancel.wait(max(0.0, self.kill_at + self.down - self.times["kill"])):
                return
            self.times["spawn"] = time.perf_counter() - self.t0
            c.server = Proc(["server", "--listen", c.address, "--db", f"sqlite:///{c.db_path}"],
                            c.tmp / "server2.log")
            wait_healthy(c.address, c.server)
            self.times["up"] = time.perf_counter() - self.t0
        except Exception as exc:
            self.error = exc


def outage(cluster: Cluster, slice_n: int, kill_at: float = 4.0, down: float = 10.0, after: float = 5.0) -> None:
    arms: dict = {}
    killer = None
    try:
        start_arms(arms, ["bare", "trainctl"], lambda a: cluster.address if a == "trainctl" else "")
        arms["bare"].reply(600)
        run_id = arms["trainctl"].reply(600)["run_id"]
        for a in arms:
            arms[a].ask(f"run {WARMUP}")
        t0 = time.perf_counter()
        killer = _Killer(cluster, t0, kill_at, down)
        killer.start()
        limit = kill_at + down + 120 + after

        def done():
            now = time.perf_counter() - t0
            if killer.error is not None or now > limit:
                raise RuntimeError(f"outage: server restart failed or too slow ({killer.error})")
            return "up" in killer.times and now > killer.times["up"] + after
        got = lockstep(arms, slice_n, until=done, t0=t0)
        fin = {a: arms[a].ask("finish", timeout=600) for a in arms}
    finally:
        if killer is not None:
            killer.cancel.set()
            killer.join()
        for a in arms.values():
            a.close()
    tm = killer.times
    with cluster.client() as c:
        state = c.get(run_id).state
        pts = sum(len(s["step"]) for s in c.metrics(run_id).values())
    end = max(x["at"][1] for c in got for x in c.values())
    rows = []
    for label, lo, hi in [("before the kill", 0.0, tm["kill"]), ("server down", tm["kill"], tm["spawn"]),
                          ("restarting", tm["spawn"], tm["up"]), ("after restart", tm["up"], end + 1)]:
        pairs = [c for c in got if all(lo <= x["at"][0] and x["at"][1] <= hi for x in c.values())]
        if not pairs:
            rows.append([label, f"{lo:.1f}-{min(hi, end):.1f} s", 0, "-", "-", "-", "-"])
            continue
        sdk_cpu = sum(c["trainctl"]["proc_cpu"] for c in pairs) / (slice_n * len(pairs))
        bare_cpu = sum(c["bare"]["proc_cpu"] for c in pairs) / (slice_n * len(pairs))
        rows.append([label, f"{lo:.1f}-{min(hi, end):.1f} s", len(pairs),
                     ci([c["bare"]["t"] / c["trainctl"]["t"] for c in pairs]),
                     f"{sum(c['bare']['t'] for c in pairs) / sum(c['trainctl']['t'] for c in pairs):.3f}",
                     f"{1000 * sdk_cpu:.3f} / {1000 * bare_cpu:.3f}",
                     ci([c["bare"]["proc_cpu"] / c["trainctl"]["proc_cpu"] for c in pairs])])
    want = 4 * fin["trainctl"]["steps"]
    print(machine())
    table(["window (since lockstep start)", "span", "pairs", "SDK/bare steps/s per pair [95 %]", "overall",
           "loop process CPU ms/step SDK / bare", "CPU ratio bare/SDK [95 %]"], rows,
          title=f"server killed mid-run, lockstep: bare and SDK alternate slices of {slice_n} steps; SIGKILL at "
                f"{tm['kill']:.1f} s, restarted at {tm['spawn']:.1f} s on the same file, serving at {tm['up']:.1f} s")
    undelivered = "; ".join(fin["trainctl"].get("undelivered") or []) or "nothing"
    print(f"points stored after restart: {pts} of {want} ({'none lost' if pts == want else 'LOST'}); "
          f"run state {state}; undelivered: {undelivered}", flush=True)
