"""Shared fixtures: real server and worker processes on loopback, a real SQLite file."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trainctl.client import Client

# One intra-op thread for torch here and in every process the tests start (workers, their
# run processes, example scripts). A run process shares CI's 2 cores with the server, its
# agent, the test and often a second worker importing torch: with torch's default of one
# OpenMP thread per core, its threads spin waiting for each other while those hold a
# core, and an 8-step digits epoch took 6-14 s instead of 1-2 s with one thread (with a
# core idle, two threads are ~1.5x faster; a test run rarely has one). Nothing a test
# asserts depends on the thread count (DDP's ranks set their own).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A trainctl subprocess whose output goes to a log file shown on failure."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.args, self.log = args, log
        self._fh = open(log, "w")
        self.popen = subprocess.Popen([sys.executable, "-m", "trainctl.client.cli", *args], stdout=self._fh,
                                      stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                      start_new_session=True)

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
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
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"server not healthy after {timeout} s:\n{proc.output()}")


# For a worker that never trains a spec run (it runs submitted commands, or nothing): its
# forkserver skips timm and sklearn (workers/runner.py), ~5 s of CPU less per start.
NO_SPEC_RUNS = {"TRAINCTL_PRELOAD": ""}


class Cluster:
    """One server process plus any number of worker processes.

    The first server start is not waited for: `address` (and so `client()`) waits until it
    serves. A worker added at once thus imports torch (~5 s) while the server starts
    (~1.5 s) instead of after it; it connects when the server is up (it retries)."""

    def __init__(self, tmp: Path, server_args: list[str] = ()):
        self.tmp = tmp
        self.db_path = tmp / "trainctl.db"
        self.port = free_port()
        self._address = f"127.0.0.1:{self.port}"
        self._serving = False
        self.server_args = list(server_args)
        self.workers: list[Proc] = []
        self.server = None
        self.start_server(wait=False)

    @property
    def address(self) -> str:
        self.wait_serving()
        return self._address

    def wait_serving(self) -> None:
        if not self._serving:
            wait_healthy(self._address, self.server)
            self._serving = True

    def start_server(self, wait: bool = True) -> Proc:
        self.server = Proc(["server", "--listen", self._address, "--db", f"sqlite:///{self.db_path}",
                            *self.server_args], self.tmp / f"server-{time.monotonic_ns()}.log")
        return self._started(wait)

    def _started(self, wait: bool) -> Proc:
        """After a (re)start: wait until it serves now, or on first use of `address`."""
        self._serving = False
        if wait:
            self.wait_serving()
        return self.server

    def add_worker(self, worker_id: str | None = None, *extra: str, env: dict | None = None) -> Proc:
        wid = worker_id or f"w{len(self.workers)}"
        p = Proc(["worker", "--server", self._address, "--worker-id", wid, "--workdir", str(self.tmp / "runs"),
                  *extra], self.tmp / f"worker-{wid}-{len(self.workers)}.log", env)
        self.workers.append(p)
        return p

    def client(self) -> Client:
        return Client(self.address)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        if self.server:
            self.server.stop()

    def logs(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.tmp.glob("*.log")))


@pytest.fixture
def cluster(tmp_path, request):
    c = Cluster(tmp_path)
    yield c
    c.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(c.logs())


@pytest.fixture(scope="module")
def server_only(tmp_path_factory):
    """A server with no worker: for validation and bookkeeping tests."""
    c = Cluster(tmp_path_factory.mktemp("server"))
    c.wait_serving()
    yield c
    c.stop()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# digits_spec's model is timm's own tiny test ResNet: a real network learning real data,
# at ~1/3.5 of resnet10t's CPU per step and ~1/13 of its checkpoint (the examples and the
# demo keep resnet10t). A test whose run must still be training when it acts (a fault, a
# steer from the CLI or a page), with step counts set on resnet10t's step time, or that
# checks learning after a few steps, passes model=RESNET10T.
RESNET10T = {"name": "resnet10t"}


def digits_spec(name: str = "t", *, epochs: int = 3, max_steps: int = 0, **overrides) -> dict:
    spec = {
        "name": name,
        "model": {"name": "test_resnet"},
        "data": {"dataset": "digits", "batch_size": 64, "img_size": 32},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 1, "warmup_lr": 0.001, "min_lr": 1e-4},
        "loss": {"name": "cross_entropy", "label_smoothing": 0.1},
        "train": {"epochs": epochs, "seed": 0, "max_steps_per_epoch": max_steps},
    }
    for key, value in overrides.items():
        spec[key] = value
    return spec


def wait_for(pred, timeout: float = 20.0, what: str = "condition", every: float = 0.05):
    """`pred()`'s first truthy value, polled every `every` s; AssertionError naming `what`
    after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def experiment_events(client, exp_id: int, timeout: float = 300) -> list:
    """Every experiment event of a run (through Client.watch) until it ends: the states and
    messages it went through, the final one last."""
    out, deadline = [], time.monotonic() + timeout
    for ev in client.watch(exp_id):
        if ev.kind == "experiment":
            out.append(ev.experiment)
            if ev.experiment.is_final:
                return out
        if time.monotonic() > deadline:
            raise TimeoutError(f"experiment {exp_id} did not end: {out}")
    return out


@pytest.fixture(autouse=True)
def _private_pack_memo(tmp_path_factory, monkeypatch):
    """`submit --code` remembers packed trees in the user's cache; tests keep their own."""
    from trainctl.client import code_sdk

    monkeypatch.setattr(code_sdk._PackMemo, "PATH", tmp_path_factory.getbasetemp() / "packed.json")
