"""Shared helpers for the benchmarks: real server / worker processes on loopback,
percentiles, tables, RSS. Nothing here is timed itself."""
from __future__ import annotations

import os
import re
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

# Training processes (bare loop and worker alike) get the same torch thread count: on a
# 2-core box shared with a server and a watcher, 2 intra-op threads thrash.
DEFAULT_THREADS = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_env(threads: int) -> dict:
    t = str(threads)
    return {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "PYTHONUNBUFFERED": "1"}


class Proc:
    def __init__(self, args: list[str], log: Path, env: Optional[dict] = None, module: str = "trainctl.client.cli"):
        self.log = log
        self._fh = open(log, "w")
        cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
        self.popen = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, start_new_session=True, cwd=str(ROOT))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._fh.close()
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def wait_healthy(address: str, proc: Proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"server exited early:\n{proc.output()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"server not healthy after {timeout} s:\n{proc.output()}")


class Cluster:
    """One real `trainctl server` process (SQLite file in a temp dir) plus real workers."""

    def __init__(self, tmp: Optional[Path] = None, server_args: list[str] = ()):
        self._tmpdir = None
        if tmp is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="trainctl-bench-")
            tmp = Path(self._tmpdir.name)
        self.tmp = tmp
        self.db_path = tmp / "trainctl.db"
        self.address = f"127.0.0.1:{free_port()}"
        self.server = Proc(["server", "--listen", self.address, "--db", f"sqlite:///{self.db_path}",
                            *server_args], tmp / "server.log")
        wait_healthy(self.address, self.server)
        self.workers: list[Proc] = []

    def add_worker(self, worker_id: str, threads: int = DEFAULT_THREADS) -> Proc:
        p = Proc(["worker", "--server", self.address, "--worker-id", worker_id, "--workdir", str(self.tmp / "runs")],
                 self.tmp / f"worker-{worker_id}.log", env=thread_env(threads))
        self.workers.append(p)
        return p

    def client(self):
        from trainctl.client import Client

        return Client(self.address)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.server.stop()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            for p in sorted(self.tmp.glob("*.log")):
                print(f"==== {p.name}\n{p.read_text()[-3000:]}", file=sys.stderr)
        self.stop()


# ---------------------------------------------------------------------- specs
def spec(name: str, *, model: str = "resnet10t", img: int = 32, batch: int = 64, steps: int = 100,
         epochs: int = 1, samples: Optional[int] = None, model_kwargs: Optional[dict] = None,
         schedule: Optional[dict] = None) -> dict:
    """A synthetic-data spec with exactly `steps` optimizer steps per epoch."""
    n_train = steps * batch
    samples = samples or max(int(n_train / 0.95) + batch + 2, 64)
    m = {"name": model}
    if model_kwargs:
        m["kwargs"] = model_kwargs
    return {
        "name": re.sub(r"[^A-Za-z0-9_.\-]+", "-", name).strip("-"),
        "model": m,
        "data": {"dataset": "synthetic", "batch_size": batch, "img_size": img, "num_samples": samples,
                 "val_fraction": 0.05},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": schedule or {"name": "cosine", "warmup_epochs": 0, "min_lr": 1e-4},
        "loss": {"name": "cross_entropy", "label_smoothing": 0.1},
        "train": {"epochs": epochs, "seed": 0, "max_steps_per_epoch": steps, "checkpoint_every": 0},
    }


# Presets: "big" is the repo's default model, "small" reaches >= 200 steps/s on a 2-core CPU.
PRESETS = {
    "resnet10t": dict(model="resnet10t", img=32, batch=64),
    "small": dict(model="test_vit", img=16, batch=8, model_kwargs={"img_size": 16}),
}


# ---------------------------------------------------------------------- numbers
def pct(xs, q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan on empty input."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def median(xs) -> float:
    return pct(xs, 50)


def bootstrap_ci(xs, level: float = 0.95, n: int = 2000) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median (fixed seed: the same data, the same answer)."""
    import random

    if len(xs) < 2:
        return float("nan"), float("nan")
    rng = random.Random(0)
    meds = sorted(median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int((1 - level) / 2 * n)], meds[int((1 + level) / 2 * n) - 1]


def table(headers: list[str], rows: list[list], title: str = "") -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) for c, w in zip(cells[0], widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    out = "\n".join(lines)
    print(out, flush=True)
    return out


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        if abs(c) >= 1000:
            return f"{c:,.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.3f}"
    return str(c)


def rss_kb(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) in KiB from /proc."""
    cur = peak = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1])
    except FileNotFoundError:
        pass
    return cur, peak


def machine() -> str:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
    except Exception:
        mem_kb = 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} CPU ({model}), {mem_kb / 2**20:.0f} GiB RAM, Python {platform.python_version()}, "
            f"load avg {load:.2f}")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process, its live descendants, and the children they reaped (a
    worker's run processes are forks of its forkserver, which reaps them)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
        except FileNotFoundError:
            pass
    return total


def descendants(pid: int, depth: int = 64) -> list[int]:
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent_of[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                pass
    out, frontier = [], [pid]
    while frontier and depth > 0:
        kids = [p for p, pp in parent_of.items() if pp in frontier]
        out += kids
        frontier, depth = kids, depth - 1
    return out


def run_processes(worker_pid: int) -> list[int]:
    """A worker's run processes: forks of its forkserver (the forkserver is its child)."""
    def cmd(p: int) -> str:
        try:
            with open(f"/proc/{p}/cmdline") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""
    direct = set(descendants(worker_pid, depth=1))
    return [p for p in descendants(worker_pid) if p not in direct and "forkserver" in cmd(p)]


def cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (all threads) from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        return float("nan")
