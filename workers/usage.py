"""Device usage for the worker's heartbeats (Heartbeat.usage), without torch.

The agent never imports torch (runs do, in their own processes), so usage is read
from the OS: for kind "cpu", the agent's process tree (itself, the forkserver and the
run processes, found by parent pid in /proc): utilization is the CPU time they used
since the last sample over the wall time (percent of one core, so up to 100 x cores),
memory_used_bytes their summed RSS (pages shared between forks count once per
process), memory_total_bytes the host's MemTotal. On GPU hosts NVML adds one entry per
CUDA device when `pynvml` (nvidia-ml-py) is importable; it is optional and skipped
silently otherwise.

Sampling walks /proc, so it is done at most every `interval` seconds and attached to
the heartbeat that falls due, not to every one. It never raises: a heartbeat without
usage beats a broken stream.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

from trainctl.v1 import trainctl_pb2 as pb

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 5.0
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _stat(pid: int) -> Optional[tuple[int, int, int, int]]:
    """(ppid, utime+stime ticks, starttime, rss pages) of a pid, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ")".
    fields = raw[raw.rfind(b")") + 2:].split()
    try:  # fields[0] is field 3 (state)
        return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19]), int(fields[21])
    except (IndexError, ValueError):
        return None


def process_tree(root: int) -> dict[int, tuple[int, int, int, int]]:
    """{pid: _stat} of `root` and all its descendants."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                stats[int(name)] = st
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st[0], []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in tree:
            tree[pid] = stats[pid]
            todo.extend(children.get(pid, ()))
    return tree


def mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class CpuSampler:
    """CPU percent and RSS of a process tree since the previous `sample()` (the first
    one: since construction)."""

    def __init__(self, root: Optional[int] = None):
        self.root = root or os.getpid()
        self.total = mem_total()
        self._cpu, self._at = self._times(process_tree(self.root)), time.monotonic()

    @staticmethod
    def _times(tree) -> dict[tuple[int, int], int]:
        # Keyed by (pid, starttime): a reused pid is a new process, not a clock going back.
        return {(pid, st[2]): st[1] for pid, st in tree.items()}

    def sample(self) -> pb.DeviceUsage:
        tree = process_tree(self.root)
        now, cpu = time.monotonic(), self._times(tree)
        # A process new since the last sample counts all its time; one that exited
        # meanwhile loses its last slice (its parent's cutime is not walked: rare, small).
        used = sum(max(0, t - self._cpu.get(k, 0)) for k, t in cpu.items())
        elapsed = max(now - self._at, 1e-3)
        self._cpu, self._at = cpu, now
        return pb.DeviceUsage(kind="cpu", index=0, utilization=100.0 * used / _TICKS / elapsed,
                              memory_used_bytes=sum(st[3] for st in tree.values()) * _PAGE,
                              memory_total_bytes=self.total)


class _Nvml:
    """Per-GPU usage through NVML; `None` from `open()` when there is none."""

    def __init__(self, nvml, handles):
        self.nvml, self.handles = nvml, handles

    @classmethod
    def open(cls) -> Optional["_Nvml"]:
        try:
            import pynvml as nvml  # optional: nvidia-ml-py
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
        except Exception:  # not installed, no driver, no GPU: CPU usage only
            return None
        # CUDA's index i is the i-th of CUDA_VISIBLE_DEVICES when it lists NVML indices.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        order = list(range(count))
        if visible is not None:
            parts = [p.strip() for p in visible.split(",") if p.strip()]
            if all(p.isdigit() for p in parts):
                order = [int(p) for p in parts if int(p) < count]
        try:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in order]
        except Exception:
            return None
        return cls(nvml, handles) if handles else None

    def sample(self) -> list[pb.DeviceUsage]:
        out = []
        for i, h in enumerate(self.handles):
            util = self.nvml.nvmlDeviceGetUtilizationRates(h)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
            out.append(pb.DeviceUsage(kind="cuda", index=i, utilization=float(util.gpu),
                                      memory_used_bytes=int(mem.used), memory_total_bytes=int(mem.total)))
        return out


class UsageSampler:
    """`due()` returns a fresh sample at most every `interval` seconds, else []. The CPU
    baseline is taken here, so construct it when the agent starts to send heartbeats."""

    def __init__(self, interval: float = SAMPLE_EVERY_S, root: Optional[int] = None):
        self.interval = interval
        self._lock = threading.Lock()  # heartbeats come from gRPC's thread, reconnects overlap
        # The first sample is a second after the baseline (a shorter span is noise).
        self._next = time.monotonic() + min(1.0, interval)
        self._cpu: Optional[CpuSampler] = None
        self._gpu: Optional[_Nvml] = None
        self._broken = False
        try:
            self._cpu = CpuSampler(root)
            self._gpu = _Nvml.open()
        except Exception as exc:  # no /proc (not Linux): heartbeats go without usage
            log.info("device usage not sampled: %s", exc)
            self._broken = self._cpu is None

    def due(self) -> list[pb.DeviceUsage]:
        with self._lock:
            now = time.monotonic()
            if self._broken or now < self._next:
                return []
            self._next = now + self.interval
            out = []
            try:
                out.append(self._cpu.sample())
            except Exception as exc:
                log.warning("cpu usage sample failed, not sampling again: %s", exc)
                self._broken = True
            if self._gpu is not None:
                try:
                    out.extend(self._gpu.sample())
                except Exception as exc:  # a lost GPU: keep reporting the CPU
                    log.warning("gpu usage sample failed, not sampling GPUs again: %s", exc)
                    self._gpu = None
            return out
