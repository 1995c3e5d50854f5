"""`trainctl demo`: the whole product in one command, on loopback.

Starts a server and a worker as real processes, submits a spec, follows it live,
changes the LR half-way through, prints the final validation accuracy and stops
everything (also on Ctrl-C).
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from trainctl.client.render import console, control_line, live_view
from trainctl.client.sdk import Client

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "trainctl.client.cli", *args], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(address: str, timeout: float = 60) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError(f"server at {address} not ready after {timeout:.0f} s")


def _steer_midway(address: str, exp_id: int, at_step: int, lr: float) -> None:
    """Waits (on its own watch stream) for the run to pass `at_step`, then sets the LR."""
    with Client(address) as c:
        for ev in c.watch(exp_id, live_only=True):
            if ev.kind == "step" and ev.step >= at_step:
                console.print(f"[bold yellow]demo[/] step {ev.step}: trainctl set-lr {exp_id} {lr:g}")
                c.set_lr(exp_id, lr)
                return
            if ev.kind == "experiment" and ev.experiment.is_final:
                return


def run_demo(*, spec: str | None, port: int, workdir: str | None, set_lr: float) -> int:
    spec_path = Path(spec) if spec else EXAMPLE
    with ExitStack() as stack:
        root = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trainctl-demo-")))
        root.mkdir(parents=True, exist_ok=True)
        address = f"127.0.0.1:{port or free_port()}"
        t0 = time.monotonic()
        console_url = f"http://127.0.0.1:{free_port()}"  # the web console, same server process
        server = start(["server", "--listen", address, "--db", f"sqlite:///{root / 'trainctl.db'}",
                        "--http", console_url.removeprefix("http://")], root / "server.log")
        stack.callback(stop, server)
        worker = start(["worker", "--server", address, "--workdir", str(root / "runs"), "--worker-id", "demo-worker"],
                       root / "worker.log")
        stack.callback(stop, worker)
        wait_ready(address)
        console.print(f"server on {address} (logs in {root}), worker started")
        console.print(f"web console: open [bold]{console_url}[/] to watch and steer in a browser")
        with Client(address) as c:
            x = c.submit(spec_path)
            console.print(f"submitted [bold]{spec_path.name}[/] as experiment {x.id}: "
                          f"{x.spec['model']['name']} on {x.spec['data']['dataset']}, "
                          f"{int(x.spec['train']['epochs'])} epochs")
            epochs = int(x.spec["train"]["epochs"])
            steps_per_epoch = _steps_per_epoch(x.spec)
            midway = steps_per_epoch * epochs // 2
            threading.Thread(target=_steer_midway, args=(address, x.id, midway, set_lr), daemon=True).start()
            live_view(c.watch(x.id), epochs=epochs, steps_total=steps_per_epoch * epochs)
            final = c.get(x.id)
            for r in c.controls(x.id):
                console.print(f"control log: {control_line(r)}")
        elapsed = time.monotonic() - t0
        if final.state != "COMPLETED":
            console.print(f"[bold red]experiment {final.id} {final.state}[/]: {final.message}")
            console.print(f"worker log: {root / 'worker.log'}")
            return 1
        console.print(f"[green]experiment {final.id} COMPLETED[/]: val_top1 [bold]{final.summary['val_top1']:.4f}[/] "
                      f"(best {final.summary['best_val_top1']:.4f}) in {elapsed:.1f} s wall")
        return 0


def _steps_per_epoch(spec: dict) -> int:
    """Only for the progress bar total and choosing the mid-run step."""
    from trainctl.client.preview import dataset_steps_per_epoch
    from trainctl.spec import parse_spec

    return dataset_steps_per_epoch(parse_spec(spec, check_model=False))
