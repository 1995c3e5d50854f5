"""One arm of bench/peers.py: the user loop with one tool (or none), in its own process,
run slice by slice on command. Both ends of that protocol live here: `serve` (the arm's
process) and `ArmProcess` (the parent's handle on it).

    python bench/_peer_arms.py ARM --address HOST:PORT --tmp DIR

The arm sets up (model, tool; trainctl attaches), prints {"ready": true, "run_id": ...}
and then answers one JSON line per command read on stdin:

    run S    S more steps of the loop: {"t": wall s, "thread_cpu": loop thread s, "proc_cpu": process s}
    mark     totals so far (the parent marks the start of the timed part with it):
             {"steps", "proc_cpu", "helper_cpu"}
    finish   the tool's final flush, timed, then the points read back from the tool's own
             store: {"flush_s", "steps", "proc_cpu", "helper_cpu", "points", ...}; then it exits

"proc_cpu" is the process's CPU (all threads: a tool's in-process work counts) and
"helper_cpu" the CPU of the processes the tool started (its descendants, e.g. W&B's
service), sampled at mark and around the flush. Tool output goes to the arm's log, never
to the protocol's stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- the arm's process
class _Helpers:
    """CPU seconds of this process's descendants (a tool's helper processes). Sampled only
    between slices (no thread of its own: the bare arm must pay nothing for it); a helper
    that exits during the flush counts up to its last sample."""

    def __init__(self):
        import psutil
        self.me, self.cpu = psutil.Process(), {}

    def total(self) -> float:
        import psutil
        try:
            for p in self.me.children(recursive=True):
                try:
                    t = p.cpu_times()
                    self.cpu[p.pid] = max(self.cpu.get(p.pid, 0.0), t.user + t.system)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return sum(self.cpu.values())


class Loop:
    """The user's loop (MLP 128-256-256-10, batch 64, SGD, 4 scalars a step) with one tool."""

    def __init__(self, arm: str, address: str, tmp: Path):
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # peers.py --threads (default 1)
        torch.manual_seed(0)
        self.torch, self.arm, self.tmp, self.i = torch, arm, tmp, 0
        self.model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                         torch.nn.ReLU(), torch.nn.Linear(256, 10))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x, self.y = torch.randn(64, 128), torch.randint(0, 10, (64,))
        self.helpers = _Helpers()
        self.out: dict = {"arm": arm, "run_id": None}
        self.run = self.log = self.flush = None
        getattr(self, "_setup_" + arm.split(":")[0].replace("-", "_"))(address)

    # One setup per tool: sets self.log(i, loss, acc, grad_norm, lr) and self.flush().
    def _setup_bare(self, address):
        pass

    def _setup_trainctl(self, address):
        import trainctl
        if ":" in self.arm:  # "trainctl:LINGER[:HANDOVER]": other settings, for an A/B in the same run
            from trainctl.attach import session
            settings = self.arm.split(":")[1:]
            session.LINGER_S = float(settings[0])
            if len(settings) > 1:
                session.ACK_HANDOVER_S = float(settings[1])
        run = self.run = trainctl.init(name="bench-peers", server=address, config={"bench": "peers"})
        run.attach(self.opt)
        if not run._session.wait_attached(30):
            raise RuntimeError(f"not attached to {address} within 30 s")
        self.out["run_id"] = run.id
        self.log = lambda i, loss, acc, gn, lr: run.log(loss=loss, acc=acc, grad_norm=gn)  # lr: by the SDK

        def flush():
            self.out["undelivered"] = run.finish(timeout=60)
        self.flush = flush

    def _setup_tensorboard(self, address):
        from torch.utils.tensorboard import SummaryWriter
        w = SummaryWriter(str(self.tmp / "tb"))

        def log(i, loss, acc, gn, lr):
            w.add_scalar("loss", loss.item(), i), w.add_scalar("acc", acc, i)
            w.add_scalar("grad_norm", gn, i), w.add_scalar("lr", lr, i)
        self.log, self.flush = log, w.close

    def _setup_mlflow(self, address, sync: bool = True):
        import mlflow
        mlflow.set_tracking_uri(f"sqlite:///{self.tmp / 'mlflow.db'}")
        mlflow.start_run()
        self.log = lambda i, loss, acc, gn, lr: mlflow.log_metrics(
            {"loss": loss.item(), "acc": acc, "grad_norm": gn, "lr": lr}, step=i, synchronous=sync)
        self.flush = mlflow.end_run  # waits for the asynchronous queue to drain

    def _setup_mlflow_async(self, address):
        self._setup_mlflow(address, sync=False)

    def _setup_wandb(self, address):
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_SILENT"] = "true"
        import wandb
        wr = wandb.init(project="bench-peers", dir=str(self.tmp), mode="offline")
        self.log = lambda i, loss, acc, gn, lr: wr.log({"loss": loss.item(), "acc": acc, "grad_norm": gn, "lr": lr},
                                                       step=i)

        def flush():
            self.out["wandb_dir"] = wr.dir
            wr.finish()
        self.flush = flush

    # The commands.
    def steps(self, n: int) -> dict:
        torch, model, opt, x, y, run, log = self.torch, self.model, self.opt, self.x, self.y, self.run, self.log
        c0, tc0 = time.process_time(), time.thread_time()
        t0 = time.perf_counter()
        for i in range(self.i, self.i + n):
            if run is not None:
                run.step()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if log is not None:
                log(i, loss.detach(), 0.5, 1.0, opt.param_groups[0]["lr"])
        t = time.perf_counter() - t0
        self.i += n
        return {"t": t, "thread_cpu": time.thread_time() - tc0, "proc_cpu": time.process_time() - c0}

    def mark(self) -> dict:
        return {"steps": self.i, "helper_cpu": self.helpers.total(), "proc_cpu": time.process_time()}

    def finish(self) -> dict:
        self.helpers.total()  # a helper that exits during the flush keeps this sample
        t0 = time.perf_counter()
        if self.flush is not None:
            self.flush()
        self.out.update(flush_s=time.perf_counter() - t0, steps=self.i, proc_cpu=time.process_time(),
                        helper_cpu=self.helpers.total())
        self.out["points"] = _read_back(self.arm, self.tmp, self.out)
        return self.out


def serve(arm: str, address: str, tmp: Path) -> None:
    proto = os.fdopen(os.dup(1), "w")  # the protocol's own copy of stdout ...
    os.dup2(2, 1)                      # ... and whatever a tool prints goes to the log

    def say(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()
    loop = Loop(arm, address, tmp)
    say({"ready": True, "run_id": loop.out["run_id"]})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            say(loop.steps(int(cmd[1])))
        elif cmd[0] == "mark":
            say(loop.mark())
        elif cmd[0] == "finish":
            say(loop.finish())
            return
        else:
            raise ValueError(f"unknown command {line!r}")


def _read_back(arm: str, tmp: Path, out: dict):
    """Points each tool stored, read from its own store (trainctl: checked by the parent)."""
    try:
        if arm == "tensorboard":
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
            ea = EventAccumulator(str(tmp / "tb"), size_guidance={"scalars": 0})
            ea.Reload()
            return sum(len(ea.Scalars(t)) for t in ea.Tags()["scalars"])
        if arm in ("mlflow", "mlflow-async"):
            import mlflow
            c = mlflow.tracking.MlflowClient()
            r = c.search_runs([c.search_experiments()[0].experiment_id])[0]
            return sum(len(c.get_metric_history(r.info.run_id, k)) for k in ("loss", "acc", "grad_norm", "lr"))
        if arm == "wandb":
            from wandb.proto import wandb_internal_pb2
            n = 0
            for f in Path(out["wandb_dir"]).parent.glob("*.wandb"):
                for data in _wandb_records(f.read_bytes()):
                    rec = wandb_internal_pb2.Record()
                    rec.ParseFromString(data)
                    if rec.WhichOneof("record_type") == "history":
                        n += sum(1 for it in rec.history.item if (it.key or (it.nested_key or [""])[0])
                                 in ("loss", "acc", "grad_norm", "lr"))
            return n
    except Exception as exc:  # a tool's reader changed: say so instead of guessing
        return f"not checked ({type(exc).__name__}: {exc})"[:120]
    return None


def _wandb_records(buf: bytes):
    """The records of a W&B .wandb file (a LevelDB-style log: a 7-byte file header, 32 KiB
    blocks, each record chunk with a 7-byte header crc32/length/type); its Python reader
    left the wandb package, so the bench reads the format itself."""
    import struct
    block, pos, part = 32768, 7, b""
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _, length, kind = struct.unpack_from("<IHB", buf, pos)
        if kind == 0 and length == 0:
            pos += left
            continue
        data = buf[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield data
        elif kind == 2:
            part = data
        elif kind == 3:
            part += data
        elif kind == 4:
            yield part + data


# ---------------------------------------------------------------------- the parent's handle
class ArmProcess:
    """A started arm. Every answer is awaited with a timeout; an arm that exits or stays
    silent raises an error naming it, with the end of its log."""

    def __init__(self, arm: str, address: str, env: dict):
        self.name = arm
        self.tmp = Path(tempfile.mkdtemp(prefix=f"peers-{arm.replace(':', '_')}-"))
        self._log = open(self.tmp / "arm.log", "w")
        # Its own process group: close() also ends any helper process the tool started.
        self.p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_peer_arms.py"), arm, "--address", address,
                                   "--tmp", str(self.tmp)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._log, text=True, cwd=str(ROOT), start_new_session=True,
                                  env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.failed = False
        self._helpers: dict = {}  # pid -> psutil.Process: the tool's helpers, even in a session of their own

    def _note_helpers(self) -> None:
        import psutil
        try:
            for h in psutil.Process(self.p.pid).children(recursive=True):
                self._helpers.setdefault(h.pid, h)
        except psutil.Error:
            pass

    def _read(self) -> None:
        for line in self.p.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def reply(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self._fail(f"no answer within {timeout:.0f} s")
        if line is None:
            self._fail(f"exited (rc {self.p.wait()})")
        return json.loads(line)

    def ask(self, command: str, timeout: float = 300) -> dict:
        if command in ("mark", "finish"):
            self._note_helpers()
        try:
            self.p.stdin.write(command + "\n")
            self.p.stdin.flush()
        except OSError:  # a broken pipe: it is gone
            pass
        else:
            return self.reply(timeout)
        self._fail(f"exited (rc {self.p.wait()}) before {command!r}")

    def _fail(self, what: str):
        self.failed = True
        self._log.flush()
        tail = (self.tmp / "arm.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"arm {self.name!r} {what}; its log ({self.tmp / 'arm.log'}) ends:\n{tail}")

    def close(self) -> None:
        """Ends the arm and its helpers (whatever state they are in); keeps a failed arm's files."""
        self._note_helpers()
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
            except OSError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):  # a helper left in the group (the arm's pgid is its pid)
            try:
                os.killpg(self.p.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.5)
        self.p.wait()
        for h in self._helpers.values():  # W&B's service starts a session of its own
            try:
                if h.is_running():  # the same process (psutil checks its start time), not a reused pid
                    h.kill()
            except Exception:
                pass
        self._log.close()
        if not self.failed:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("arm")
    p.add_argument("--address", default="")
    p.add_argument("--tmp", required=True)
    args = p.parse_args()
    serve(args.arm, args.address, Path(args.tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
