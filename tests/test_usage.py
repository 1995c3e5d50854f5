"""Device usage in heartbeats (issue 14, Workers page): sampled by the worker from /proc
(and NVML when present), kept per session by the server, shown by ListWorkers and
exported as Prometheus gauges."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import types

import grpc
import pytest

from tests.scripted import RunningServer, in_loop
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.workers import usage


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds  # CPU time, so a loaded machine still burns it all
    while time.process_time() < end:
        pass


# ---------------------------------------------------------------------- sampling
def test_cpu_sample_of_this_process_counts_its_cpu_and_rss():
    s = usage.CpuSampler()
    _burn(0.3)
    u = s.sample()
    assert (u.kind, u.index) == ("cpu", 0)
    # 0.3 s of CPU over the elapsed wall time: well above 0 even when the machine is shared.
    assert 5.0 < u.utilization <= 100.0 * os.cpu_count() + 10
    assert 0 < u.memory_used_bytes < u.memory_total_bytes
    assert u.memory_total_bytes == usage.mem_total() > 0
    time.sleep(0.3)  # idle now: the next sample covers only this sleep
    assert s.sample().utilization < u.utilization


def test_cpu_sample_counts_child_processes():
    """The agent itself idles; its run processes do the work: they must be counted."""
    s = usage.CpuSampler()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 30\n"
                              "while time.process_time() < end: pass"])
    try:
        time.sleep(1.5)
        assert child.pid in usage.process_tree(os.getpid())
        u = s.sample()
    finally:
        child.kill()
        child.wait()
    assert u.utilization > 20.0  # the child's ~1 s of CPU; this process slept
    assert child.pid not in usage.process_tree(os.getpid())  # gone once it exited


def test_stat_parses_a_command_name_with_spaces_and_parens():
    child = subprocess.Popen([sys.executable, "-c", "import ctypes, time\n"
                              "ctypes.CDLL(None).prctl(15, b'a) b (c', 0, 0, 0)\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while b"a) b (c" not in open(f"/proc/{child.pid}/stat", "rb").read():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ppid, _, _, rss = usage._stat(child.pid)
        assert ppid == os.getpid() and rss > 0
    finally:
        child.kill()
        child.wait()


def test_sampled_at_most_every_interval():
    s = usage.UsageSampler(interval=0.3)
    assert s.due() == []  # the baseline is just taken: no sample over a zero span
    time.sleep(0.35)
    (cpu,) = s.due()  # no pynvml in the test venv: CPU only
    assert cpu.kind == "cpu" and cpu.memory_used_bytes > 0
    assert s.due() == []
    time.sleep(0.35)
    assert [u.kind for u in s.due()] == ["cpu"]


def test_without_pynvml_gpus_are_skipped_silently(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert usage._Nvml.open() is None


def test_nvml_devices_follow_cuda_visible_devices(monkeypatch):
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 4, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=10 * h),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=h << 30, total=80 << 30))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    got = usage._Nvml.open().sample()
    assert [(u.kind, u.index, u.utilization, u.memory_used_bytes) for u in got] == \
        [("cuda", 0, 20.0, 2 << 30), ("cuda", 1, 30.0, 3 << 30)]
    s = usage.UsageSampler(interval=0.0)
    time.sleep(0.01)
    assert [(u.kind, u.index) for u in s.due()] == [("cpu", 0), ("cuda", 0), ("cuda", 1)]

    def lost(h):
        raise RuntimeError("GPU is lost")

    fake.nvmlDeviceGetUtilizationRates = lost  # a lost GPU: the CPU is still reported
    assert [u.kind for u in s.due()] == ["cpu"]


# ---------------------------------------------------------------------- server side
def _scrape_usage(port: int) -> dict[tuple[str, str, str, str], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, s.labels["worker"], s.labels["kind"], s.labels["index"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith("trainctl_worker_")}


@in_loop
async def test_heartbeat_usage_shows_in_list_workers_and_prometheus(tmp_path):
    from trainctl.server.app import ServerConfig, create_server

    config = ServerConfig(db_url=f"sqlite:///{tmp_path / 'trainctl.db'}", lease_timeout=5.0, heartbeat_interval=0.2,
                          grace=0.5, metrics_port=0)
    server, port = create_server("127.0.0.1:0", config)
    await server.start()
    srv = RunningServer(server, port)
    try:
        stub = pb_grpc.ExperimentsStub(srv.channel)
        w = await srv.worker("w-usage")
        assert await asyncio.to_thread(_scrape_usage, server.metrics.port) == {}  # nothing sampled yet
        sent = [pb.DeviceUsage(kind="cpu", index=0, utilization=150.5, memory_used_bytes=3 << 30,
                               memory_total_bytes=16 << 30),
                pb.DeviceUsage(kind="cuda", index=1, utilization=87.0, memory_used_bytes=40 << 30,
                               memory_total_bytes=80 << 30)]
        w.heartbeat(usage=sent)

        async def listed():
            (info,) = (await stub.ListWorkers(pb.ListWorkersRequest())).workers
            return list(info.usage)

        assert await srv.until(listed, what="usage in ListWorkers") == sent
        assert await asyncio.to_thread(_scrape_usage, server.metrics.port) == {
            ("trainctl_worker_utilization_percent", "w-usage", "cpu", "0"): 150.5,
            ("trainctl_worker_memory_used_bytes", "w-usage", "cpu", "0"): float(3 << 30),
            ("trainctl_worker_utilization_percent", "w-usage", "cuda", "1"): 87.0,
            ("trainctl_worker_memory_used_bytes", "w-usage", "cuda", "1"): float(40 << 30)}

        # Heartbeats between samples carry none: the latest sample stays.
        w.heartbeat()
        w.heartbeat(usage=[pb.DeviceUsage(kind="cpu", index=0, utilization=1.0, memory_used_bytes=1)])
        await srv.until(lambda: [u.utilization for u in srv.dispatcher.sessions["w-usage"].usage] == [1.0],
                        what="newer usage")
        w.heartbeat()
        await asyncio.sleep(0.3)
        assert [u.utilization for u in await listed()] == [1.0]

        # A worker cannot mint label values or grow the server: unknown kinds and absurd
        # indexes are dropped and the list is capped.
        junk = [pb.DeviceUsage(kind="x" * 50, index=0)] + [pb.DeviceUsage(kind="cuda", index=i) for i in range(60, 100)]
        w.heartbeat(usage=junk)
        await srv.until(lambda: len(srv.dispatcher.sessions["w-usage"].usage) == 4, what="filtered usage")
        assert {u.kind for u in await listed()} == {"cuda"}

        # Gone from the gauges once the worker disconnects (stale load is no load).
        await w.close()
        srv.workers.remove(w)
        await srv.until(lambda: "w-usage" not in srv.dispatcher.sessions, what="session closed")
        assert await asyncio.to_thread(_scrape_usage, server.metrics.port) == {}
    finally:
        for w in srv.workers:
            await w.close()
        await srv.channel.close()
        await server.stop(0.5)


# ---------------------------------------------------------------------- real worker
@pytest.mark.slow
def test_a_real_worker_reports_its_cpu_usage(tmp_path):
    from tests.conftest import NO_SPEC_RUNS, Cluster

    c = Cluster(tmp_path)
    try:
        c.add_worker("w-real", env=NO_SPEC_RUNS)  # it runs nothing
        deadline = time.monotonic() + 90  # the worker imports torch before its hello; shared CI cores
        with grpc.insecure_channel(c.address) as ch:
            stub = pb_grpc.ExperimentsStub(ch)
            while True:
                workers = stub.ListWorkers(pb.ListWorkersRequest()).workers
                if workers and workers[0].usage:
                    break
                assert time.monotonic() < deadline, c.logs()
                time.sleep(0.2)
        (info,) = workers
        cpu = [u for u in info.usage if u.kind == "cpu"]
        assert len(cpu) == 1 and cpu[0].index == 0
        # The agent and its forkserver (torch imported): hundreds of MB, below the host's total.
        assert 10 << 20 < cpu[0].memory_used_bytes < cpu[0].memory_total_bytes
        assert cpu[0].utilization >= 0.0
    finally:
        c.stop()
