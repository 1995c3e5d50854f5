"""The lockstep machinery of bench/peers.py: arms answer "run S" one at a time in
rotating orders (bench/_peer_arms.py is the arm's side), a watcher process per trainctl
run, CPU of a helper process, the median-and-interval figure.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

from _common import ROOT, bootstrap_ci, cpu_s, median, thread_env
from _peer_arms import ArmProcess

THREADS = 1  # torch intra-op threads of every arm (peers.py --threads)
WARMUP = 200  # untimed steps per arm before the lockstep


class Watcher:
    """One watcher of a run in its own process (bench/_watchers.py), as a user's `trainctl watch`."""

    def __init__(self, address: str, run_id: int):
        self.p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_watchers.py"), address, str(run_id), "1",
                                   "0"], stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        if not json.loads(self.p.stdout.readline() or "{}").get("ready"):
            self.close()
            raise RuntimeError(f"watcher of run {run_id} did not start (rc {self.p.poll()})")

    def cpu(self) -> float:
        return cpu_s(self.p.pid)

    def finish(self, timeout: float = 60) -> tuple[dict, float]:
        """What it saw and its whole CPU (its rusage, all threads), once the run is over and
        it has exited; killed after `timeout` s."""
        timer = threading.Timer(timeout, self.p.kill)
        timer.start()
        out = self.p.stdout.read()
        _, status, ru = os.wait4(self.p.pid, 0)  # not Popen.wait: that would drop the rusage
        timer.cancel()
        self.p.returncode = os.waitstatus_to_exitcode(status)
        lines = out.splitlines()
        if self.p.returncode != 0 or not lines:
            raise RuntimeError(f"watcher failed (rc {self.p.returncode}): {out[-1000:]}")
        return json.loads(lines[-1])["watchers"][0], ru.ru_utime + ru.ru_stime

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def order(names: list[str], cycle: int) -> list[str]:
    """Cycle `cycle`'s order: block b = one seeded shuffle, rotated by the cycle's place in it."""
    n = len(names)
    base = names[:]
    random.Random(cycle // n).shuffle(base)
    k = cycle % n
    return base[k:] + base[:k]


def lockstep(arms: dict, slice_n: int, cycles: int = 0, until=None, t0: float = 0.0) -> list[dict]:
    """Cycles of one slice per arm; each answer gets "at": (start, end) in the parent's clock since t0."""
    out, c = [], 0
    while (cycles and c < cycles) or (not cycles and not until()):
        cyc = {}
        for name in order(list(arms), c):
            a = time.perf_counter() - t0
            r = arms[name].ask(f"run {slice_n}")
            r["at"] = (a, time.perf_counter() - t0)
            cyc[name] = r
        out.append(cyc)
        c += 1
    return out


def ci(xs: list) -> str:
    lo, hi = bootstrap_ci(xs)
    return f"{median(xs):.3f} [{lo:.3f}, {hi:.3f}]"


def start_arms(arms: dict, names: list[str], address_of) -> None:
    for a in names:  # all set up at once (untimed), then answered one by one
        arms[a] = ArmProcess(a, address_of(a), thread_env(THREADS))
