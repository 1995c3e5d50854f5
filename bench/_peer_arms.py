"""One arm of bench/peers.py, in a fresh process: the user loop with one tool (or none).

    python bench/_peer_arms.py ARM --steps N --address HOST:PORT --tmp DIR

Prints one JSON line with steps/s (loop only, and loop + the tool's final flush), the
loop process's CPU per step, its helper processes' CPU, per-step time stamps (bare and
trainctl: the outage window is read from them) and the points read back from the tool's
own store. The trainctl arm first prints {"run_id": N} and waits for a line on stdin
(the parent starts its watcher meanwhile).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

def _cpu_of(procs: dict, pids) -> None:
    import psutil
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            procs[pid] = t.user + t.system
        except psutil.Error:
            pass


class _Helpers:
    """CPU seconds of this process's descendants (a tool's helper processes), sampled
    every 0.1 s so one that exits at finish still counts (up to its last sample)."""

    def __init__(self):
        import psutil
        self.me = psutil.Process()
        self.cpu: dict = {}
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(0.1)

    def sample(self):
        try:
            _cpu_of(self.cpu, [p.pid for p in self.me.children(recursive=True)])
        except Exception:
            pass

    def total(self) -> float:
        self.sample()
        self.stop.set()
        return sum(self.cpu.values())


def child(arm: str, steps: int, address: str, tmp: Path) -> dict:
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # peers.py --threads (default 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 128), torch.randint(0, 10, (64,))
    helpers = _Helpers()
    out: dict = {"arm": arm, "steps": steps}
    log = finish = None
    run = None
    if arm.startswith("trainctl"):
        import trainctl
        if ":" in arm:  # "trainctl:LINGER[:HANDOVER]": other settings, for an A/B in the same rounds
            from trainctl.attach import session
            settings = arm.split(":")[1:]
            session.LINGER_S = float(settings[0])
            if len(settings) > 1:
                session.ACK_HANDOVER_S = float(settings[1])
        run = trainctl.init(name="bench-peers", server=address, config={"bench": "peers"})
        run.attach(opt)
        run._session.wait_attached(30)
        out["run_id"] = run.id
        print(json.dumps({"run_id": run.id}), flush=True)  # the parent starts the watcher / pinger
        sys.stdin.readline()                                  # ... and says go

        def log(i, loss, acc, gn, lr):
            run.log(loss=loss, acc=acc, grad_norm=gn)  # lr: logged by the SDK itself at step()

        def finish():
            out["undelivered"] = run.finish(timeout=60)
    elif arm == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        w = SummaryWriter(str(tmp / "tb"))

        def log(i, loss, acc, gn, lr):
            w.add_scalar("loss", loss.item(), i), w.add_scalar("acc", acc, i)
            w.add_scalar("grad_norm", gn, i), w.add_scalar("lr", lr, i)

        finish = w.close
    elif arm in ("mlflow", "mlflow-async"):
        import mlflow
        mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
        mlflow.start_run()
        sync = arm == "mlflow"

        def log(i, loss, acc, gn, lr):
            mlflow.log_metrics({"loss": loss.item(), "acc": acc, "grad_norm": gn, "lr": lr}, step=i, synchronous=sync)

        def finish():
            mlflow.end_run()  # waits for the asynchronous queue to drain
    elif arm == "wandb":
        import wandb
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_SILENT"] = "true"
        wr = wandb.init(project="bench-peers", dir=str(tmp), mode="offline")

        def log(i, loss, acc, gn, lr):
            wr.log({"loss": loss.item(), "acc": acc, "grad_norm": gn, "lr": lr}, step=i)

        def finish():
            out["wandb_dir"] = wr.dir
            wr.finish()
    stamps = [] if arm == "bare" or arm.startswith("trainctl") else None
    cpu_stamps: list = []
    c0, tc0 = time.process_time(), time.thread_time()
    t0 = time.perf_counter()
    for i in range(steps):
        if run is not None:
            run.step()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None:
            log(i, loss.detach(), 0.5, 1.0, opt.param_groups[0]["lr"])
        if stamps is not None:
            stamps.append(time.perf_counter())
            if i % 100 == 0:  # the process's CPU too: per window, far steadier than steps/s on a shared box
                cpu_stamps.append((i, stamps[-1] - t0, time.process_time() - c0))
    t_loop = time.perf_counter() - t0
    out["loop_thread_cpu_ms_step"] = 1000 * (time.thread_time() - tc0) / steps  # the loop's own thread
    if finish is not None:
        finish()
    t_all = time.perf_counter() - t0
    # CPU of the loop's process (all its threads: the tool's in-process work counts) per
    # step: far less sensitive to other load on the box than steps/s.
    out["cpu_ms_step"] = 1000 * (time.process_time() - c0) / steps
    out.update(loop_sps=steps / t_loop, sps=steps / t_all, helper_cpu_s=helpers.total(),
               stamps=[s - t0 for s in stamps] if stamps is not None else None, cpu_stamps=cpu_stamps)
    out["points"] = _read_back(arm, tmp, out)
    return out


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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("arm")
    p.add_argument("--address", default="")
    p.add_argument("--tmp", required=True)
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args()
    print(json.dumps(child(args.arm, args.steps, args.address, Path(args.tmp))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
