"""Cost of the attach SDK in a user's loop.

    python bench/attach_step.py              # real server on loopback (~1 min)
    python bench/attach_step.py --offline    # no server (an address nothing listens on)

1. ns per `run.step()` with nothing due (optimizer attached: the boundary also reads the
   LR for the automatic `lr` series), and per `run.log()` of 4 scalars.
2. A tiny loop (MLP 64-64-10, batch 32, SGD + StepLR, CPU, 1 torch thread) bare vs the
   same loop with `run.step()` + `run.log(4 scalars, one a tensor)`, interleaved rounds
   in one process; ratio = median of per-round (SDK steps/s / bare steps/s) with a
   bootstrap 95 % interval, and the server's CPU per step during each arm's rounds
   (`--linger 0.2` runs the SDK with the old row linger). Target (issue 12): >= 0.99.
3. With --ack: a client sends scale-lr 1.0 every 0.2 s during the SDK rounds; time to
   the APPLIED answer, p50/p99 (target: one step + 20 ms).
4. --ddp (python bench/attach_step.py --ddp --steps 4000): 2 gloo CPU ranks; us per
   `run.step()` with sync_every 16 and 1, nothing due and with commands; a DDP loop's
   SDK/bare ratio.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Cluster, bootstrap_ci, cpu_s, machine, median, table  # noqa: E402

import torch  # noqa: E402

import trainctl  # noqa: E402


def micro(run, n: int) -> tuple[float, float, float]:
    """(ns per step() on the loop's thread, ns per log(4 scalars), background us per row).
    The loop-side figures are timed in chunks of 1000 with the rows handed on between
    chunks, as the background thread does every 0.2 s, so the heap does not grow."""
    chunk = 1000
    step_ns = log_ns = 0
    for _ in range(n // chunk):
        t0 = time.perf_counter_ns()
        for _ in range(chunk):
            run.step()
        t1 = time.perf_counter_ns()
        for i in range(chunk):
            run.log(loss=0.5, acc=0.9, grad_norm=1.0, tokens=i)
        t2 = time.perf_counter_ns()
        step_ns += t1 - t0
        log_ns += t2 - t1
        run._rows.clear()
    # The other side: converting rows and sealing them into metric batches (another
    # thread: it competes for the GIL, so it is part of what the loop pays).
    rows = [(1, i, 0, 0.0, {"lr": 0.1, "loss": torch.tensor(0.5), "acc": 0.9, "grad_norm": 1.0, "tokens": i})
            for i in range(20_000)]
    run._rows.extend(rows)
    t0 = time.perf_counter_ns()
    run._session.pump()
    bg_us = (time.perf_counter_ns() - t0) / len(rows) / 1000
    return step_ns / n, log_ns / n, bg_us


def ack_latency(address: str, run_id: int, stop, out: list) -> None:
    """scale-lr 1.0 (a no-op on the LR) every 0.2 s while the SDK arm runs: seconds from
    the request to the APPLIED answer (the run acknowledges at its next step)."""
    from trainctl.client import Client
    with Client(address) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = c.scale_lr(run_id, 1.0, wait=10)
                if r.status == "APPLIED":
                    out.append(time.perf_counter() - t0)
            except Exception:
                pass
            stop.wait(0.2)


def loop(steps: int, run=None) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000, gamma=0.5)
    if run is not None:
        run.attach(opt, sched)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    t0 = time.perf_counter()
    for i in range(steps):
        if run is not None:
            run.step()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if run is not None:
            run.log(loss=loss.detach(), acc=0.5, grad_norm=1.0, tokens=i)
    return steps / (time.perf_counter() - t0)


def ddp_rank(rank: int, port: int, steps: int) -> None:
    """One of 2 gloo CPU ranks (--ddp): per-step cost of the SDK's rank sync, timed on
    `run.step()` alone (no training: the sync is all there is), nothing due and with a
    command arriving on rank 0 every 50 steps; then a DDP loop bare vs with the SDK."""
    import json
    import os
    import torch.distributed as dist
    from trainctl.v1 import trainctl_pb2 as pb
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    res = {}
    for every in (16, 1):
        run = trainctl.init(name="bench-ddp", server="127.0.0.1:1", sync_every=every)
        run.attach(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
        for label, cmd_every in (("nothing due", 0), ("a command every 50 steps", 50)):
            dist.barrier()
            t0 = time.perf_counter_ns()
            for i in range(steps):
                if cmd_every and rank == 0 and i % cmd_every == 0:
                    run._incoming.append(pb.ControlCommand(command_id=f"c{every}-{i}", kind=pb.SCALE_LR, value=1.0))
                run.step()
            res[f"run.step(), sync_every={every}, {label}"] = (time.perf_counter_ns() - t0) / steps
        run.finish(timeout=0.5)
    from torch.nn.parallel import DistributedDataParallel as DDP

    def ddp_loop(run) -> float:
        torch.manual_seed(0)
        model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        if run is not None:
            run.attach(opt)
        x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(steps // 4):
            if run is not None:
                run.step()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if run is not None:
                run.log(loss=loss.detach(), acc=0.5, grad_norm=1.0, tokens=i)
        return (steps // 4) / (time.perf_counter() - t0)

    run = trainctl.init(name="bench-ddp-loop", server="127.0.0.1:1")
    ratios = []
    for r in range(6):
        arms = (None, run) if r % 2 == 0 else (run, None)
        got = {id(a): ddp_loop(a) for a in arms}
        ratios.append(got[id(run)] / got[id(None)])
    run.finish(timeout=0.5)
    lo, hi = bootstrap_ci(ratios)
    res["ddp loop ratio SDK/bare"] = f"{median(ratios):.3f} [{lo:.3f}, {hi:.3f}]"
    if rank == 0:
        print(json.dumps(res), flush=True)
    dist.destroy_process_group()


def ddp_main(steps: int) -> int:
    import json
    import os
    import subprocess
    from _common import free_port
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--ddp-rank", str(r), "--port", str(port), "--steps",
                               str(steps)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    res = json.loads([ln for ln in outs[0].splitlines() if ln.startswith("{")][-1])
    print(machine())
    table(["measure (2 gloo CPU ranks, rank 0)", "value"],
          [[k, f"{v / 1000:.1f} us" if isinstance(v, float) else v] for k, v in res.items()],
          title=f"attach SDK under DDP, {steps} steps")
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ddp", action="store_true", help="2 gloo CPU ranks: the rank-sync cost per step")
    p.add_argument("--ddp-rank", type=int, default=-1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--offline", action="store_true")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--micro", type=int, default=200_000)
    p.add_argument("--linger", type=float, default=None, help="the SDK's row linger in s (default: the SDK's own, "
                                                               "trainctl.attach.session.LINGER_S)")
    p.add_argument("--ack", action="store_true", help="also measure scale-lr ack latency during the SDK rounds "
                                                     "(its client shares the box: not in the ratio runs)")
    args = p.parse_args()
    if args.ddp_rank >= 0:
        ddp_rank(args.ddp_rank, args.port, args.steps)
        return 0
    if args.ddp:
        return ddp_main(args.steps)
    torch.set_num_threads(1)
    from trainctl.attach import session
    if args.linger is not None:
        session.LINGER_S = args.linger
    cluster = None if args.offline else Cluster()
    try:
        server = "127.0.0.1:1" if cluster is None else cluster.address
        run = trainctl.init(name="bench-attach", server=server, config={"bench": "attach_step"})
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        run.attach(opt)
        step_ns, log_ns, bg_us = micro(run, args.micro)
        loop(200), loop(200, run)  # warm-up
        bare, sdk, ratios, acks = [], [], [], []
        server_cpu = {"bare": 0.0, "sdk": 0.0}  # the server's CPU during each arm's rounds
        for r in range(args.rounds):
            arms = ("bare", "sdk") if r % 2 == 0 else ("sdk", "bare")
            got = {}
            for a in arms:
                stop = threading.Event()
                pinger = None
                if a == "sdk" and cluster is not None and run.id and args.ack:
                    pinger = threading.Thread(target=ack_latency, args=(cluster.address, run.id, stop, acks))
                    pinger.start()
                c0 = cpu_s(cluster.server.pid) if cluster is not None else 0.0
                got[a] = loop(args.steps, run if a == "sdk" else None)
                if a == "sdk" and cluster is not None:
                    time.sleep(session.LINGER_S + 0.05)  # its last rows reach the server inside this arm
                server_cpu[a] += (cpu_s(cluster.server.pid) - c0) if cluster is not None else 0.0
                stop.set()
                if pinger is not None:
                    pinger.join()
            bare.append(got["bare"]), sdk.append(got["sdk"]), ratios.append(got["sdk"] / got["bare"])
        lo, hi = bootstrap_ci(ratios)
        acks.sort()
        undelivered = run.finish(timeout=30)
        print(machine())
        table(["measure", "value"], [
            ["run.step(), nothing due", f"{step_ns:.0f} ns"],
            ["run.log(4 scalars)", f"{log_ns:.0f} ns"],
            ["background, per row (convert + seal)", f"{bg_us:.1f} us"],
            ["bare loop", f"{median(bare):.0f} steps/s"],
            ["with the SDK", f"{median(sdk):.0f} steps/s"],
            ["ratio SDK/bare (median of rounds)", f"{median(ratios):.3f} [{lo:.3f}, {hi:.3f}]"],
            ["server CPU per step, SDK rounds / bare rounds", "-" if cluster is None else
             f"{1e6 * server_cpu['sdk'] / (args.rounds * args.steps):.1f} / "
             f"{1e6 * server_cpu['bare'] / (args.rounds * args.steps):.1f} us (rows every {session.LINGER_S:g} s)"],
            ["scale-lr acked (p50 / p99, n)", "-" if not acks else
             f"{1000 * acks[len(acks) // 2]:.1f} / {1000 * acks[min(len(acks) - 1, int(0.99 * len(acks)))]:.1f} ms"
             f" ({len(acks)}; one step = {1000 / median(sdk):.2f} ms)"],
            ["server", "none (offline)" if cluster is None else f"real, on loopback; experiment {run.id}"],
            ["undelivered at finish", "; ".join(undelivered) or "nothing"],
        ], title=f"attach SDK cost, {args.rounds} interleaved rounds x {args.steps} steps")
    finally:
        if cluster is not None:
            cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
