"""The attach SDK against the trackers users have (issue 12), on one user loop.

    python bench/peers.py                 # ~6-10 min on a 2-core box
    python bench/peers.py --rounds 3 --steps 1000 --skip-outage

One loop: an MLP 128-256-256-10 on CPU (batch 64, SGD, 1 torch thread), 4 scalars a
step (loss, acc, grad_norm, lr). Each arm runs in a fresh process (a tool's threads and
helper processes never leak into the next arm), arms interleaved round by round in a
rotating order; the timed window is the loop PLUS the tool's final flush (an
asynchronous logger's drain is part of what the user waits for). Figures: steps/s, the
ratio to the bare arm of the same round (median over rounds, 95 % bootstrap interval),
CPU seconds per 1000 steps of any helper process the tool starts (its descendants; for
trainctl: the server and the one watcher), and whether every point arrived (read back
from each tool's own store). Peers: TensorBoard SummaryWriter, MLflow (SQLite store,
synchronous, and `log_metrics(..., synchronous=False)`), W&B offline. A peer that is not
installed is skipped with a line saying so.

Then, trainctl only:
- set-lr latency: a client sends `scale-lr 1.0` (no change to the LR) every 0.2 s to an
  attached run; time to the APPLIED answer, p50/p99 (target <= one step + 20 ms).
- outage: the server is SIGKILLed 4 s into a run and restarted 10 s later; the loop's
  steps/s in that window vs a bare run (target >= 0.99), and every point stored after
  the restart.
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
NEEDS = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "mlflow-async": "mlflow", "wandb": "wandb"}


# ---------------------------------------------------------------------- the child: one arm
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


def child(arm: str, steps: int, address: str, tmp: Path, ack_period: float) -> dict:
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 128), torch.randint(0, 10, (64,))
    helpers = _Helpers()
    out: dict = {"arm": arm, "steps": steps}
    log = finish = None
    run = None
    if arm == "trainctl":
        import trainctl
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
    stamps = [] if arm in ("bare", "trainctl") else None
    c0 = time.process_time()
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
    t_loop = time.perf_counter() - t0
    if finish is not None:
        finish()
    t_all = time.perf_counter() - t0
    # CPU of the loop's process (all its threads: the tool's in-process work counts) per
    # step: far less sensitive to other load on the box than steps/s.
    out["cpu_ms_step"] = 1000 * (time.process_time() - c0) / steps
    out.update(loop_sps=steps / t_loop, sps=steps / t_all, helper_cpu_s=helpers.total(),
               stamps=[s - t0 for s in stamps] if stamps is not None else None)
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


# ---------------------------------------------------------------------- the parent
class Arm:
    def __init__(self, arm: str, steps: int, address: str, ack_period: float = 0.0):
        self.tmp = Path(tempfile.mkdtemp(prefix=f"peers-{arm}-"))
        env = {**os.environ, **thread_env(1), "PYTHONPATH": str(ROOT)}
        self.p = subprocess.Popen([sys.executable, __file__, "--child", arm, "--steps", str(steps),
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


def run_trainctl(cluster: Cluster, steps: int, pinger=None) -> dict:
    """One trainctl arm: the child attaches, a watcher (its own process) watches, go."""
    a = Arm("trainctl", steps, cluster.address)
    run_id = a.first_line()["run_id"]
    watcher = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_watchers.py"), cluster.address, str(run_id),
                                "1", "0"], stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert json.loads(watcher.stdout.readline())["ready"]
    cpu0 = _proc_cpu(cluster.server.pid)
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
    res["helper_cpu_s"] += _proc_cpu(cluster.server.pid) - cpu0 + ru.ru_utime + ru.ru_stime
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


def peers(cluster: Cluster, rounds: int, steps: int) -> None:
    arms = [a for a in ARMS if not available(a)]
    for a in ARMS:
        if available(a):
            print(f"skipped {a}: {available(a)}", flush=True)
    got: dict = {a: [] for a in arms}
    for r in range(rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for a in order:
            res = run_trainctl(cluster, steps) if a == "trainctl" else Arm(a, steps, cluster.address).result()
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
        cr = [b.get("cpu_ms_step", math.nan) / x for x, b in zip(cpu, got["bare"])]
        clo, chi = bootstrap_ci(cr)
        rows.append([a, f"{median([x['sps'] for x in got[a]]):.0f}", f"{median([x['loop_sps'] for x in got[a]]):.0f}",
                     f"{median(ratios):.3f} [{lo:.3f}, {hi:.3f}]",
                     f"{median(cpu):.3f}", f"{median(cr):.3f} [{clo:.3f}, {chi:.3f}]",
                     f"{1000 * median([x['helper_cpu_s'] for x in got[a]]) / steps:.2f}" if a != "bare" else "-", lost])
    print(machine())
    table(["arm", "steps/s (incl. flush)", "loop only", "ratio to bare [95 %]", "loop CPU ms/step",
           "bare CPU / arm CPU [95 %]", "helper CPU ms/step",
           "points lost"], rows, title=f"peers: MLP 128-256-256-10 CPU, 4 scalars/step, {rounds} interleaved rounds "
                                        f"x {steps} steps")
    if got.get("trainctl"):
        print("trainctl watcher:", "; ".join(x["watcher"] for x in got["trainctl"]))


def ack_latency(cluster: Cluster, steps: int) -> None:
    from trainctl.client import Client
    lat: list = []

    def pinger(run_id, stop):
        with Client(cluster.address) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    if c.scale_lr(run_id, 1.0, wait=10).status == "APPLIED":
                        lat.append(time.perf_counter() - t0)
                except Exception:
                    pass
                stop.wait(0.2)

    res = run_trainctl(cluster, steps, pinger)
    lat.sort()
    step_ms = 1000 / res["loop_sps"]
    table(["measure", "value"], [
        ["scale-lr acked p50 / p99", f"{1000 * pct(lat, 50):.1f} / {1000 * pct(lat, 99):.1f} ms (n={len(lat)})"],
        ["one step", f"{step_ms:.2f} ms; target p99 <= {step_ms + 20:.1f} ms"],
    ], title="set-lr (scale-lr 1.0 every 0.2 s) on an attached run, one watcher")


def outage(cluster: Cluster, steps: int, kill_at: float, down: float) -> None:
    bare = Arm("bare", steps // 3, cluster.address).result()
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

    def window_sps(stamps, lo, hi):
        n = sum(1 for s in stamps if lo <= s < hi)
        return n / (hi - lo)

    # The child's clock starts a little after "go" (tens of ms; negligible next to 10 s).
    sdk_w = window_sps(res["stamps"], t_kill, t_spawn)  # the server dead (its restart: next line)
    sdk_r = window_sps(res["stamps"], t_spawn, t_up)
    bare_w = bare["loop_sps"]  # a bare run just before, whole loop
    with cluster.client() as c:
        x = c.get(run_id)
        stored = c.metrics(run_id)
    pts = sum(len(s["step"]) for s in stored.values())
    table(["measure", "value"], [
        ["server down", f"{t_kill:.1f} s .. {t_spawn:.1f} s after go (SIGKILL), restarting on the same file "
                        f"until {t_up:.1f} s"],
        ["loop steps/s while down", f"{sdk_w:.0f} (bare run just before: {bare_w:.0f}); ratio {sdk_w / bare_w:.3f}"],
        ["loop steps/s while it restarts", f"{sdk_r:.0f}; ratio {sdk_r / bare_w:.3f} (the new server's start "
                                           "shares the 2 cores)"],
        ["points stored after restart", f"{pts} of {4 * steps} ({'none lost' if pts == 4 * steps else 'LOST'})"],
        ["run state / undelivered", f"{x.state} / {'; '.join(res.get('undelivered') or []) or 'nothing'}"],
    ], title="server killed mid-run")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--child")
    p.add_argument("--address", default="")
    p.add_argument("--tmp", default="")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-outage", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.address, Path(args.tmp), 0.0)), flush=True)
        return 0
    cluster = Cluster()
    try:
        peers(cluster, args.rounds, args.steps)
        ack_latency(cluster, 20_000)
        if not args.skip_outage:
            outage(cluster, 20_000, kill_at=4.0, down=10.0)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
