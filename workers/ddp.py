"""Multi-process training (DDP) for a worker: `resources: {nproc: N, nnodes: M}`.

Design, and why it is this shape:

* **Launching** is torch's own elastic launcher (`elastic_launch(LaunchConfig(...))`, what
  `torchrun` runs): it does the rendezvous, sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for
  each rank, spawns the ranks ("spawn", never fork: the agent process has gRPC threads),
  watches them and tears every rank down when one dies. One node: c10d rendezvous on
  localhost:0 (`torchrun --standalone`: a free port, nothing to configure). Several
  nodes: static rendezvous with this agent's node as node 0 at TRAINCTL_DDP_MASTER
  (host:port), so global rank 0 is always here; the other nodes join with
  `python -m trainctl.workers.ddp SPEC --node-rank K --master HOST:PORT --checkpoint-dir DIR`.
  Each rank joins the process group with `RankContext.start` (engine/distributed.py):
  `init_process_group` over the launcher's env://, gloo on CPU, nccl on CUDA.
* **The bridge** between rank 0 and the agent is two spawn-context multiprocessing
  queues handed to the entrypoint as arguments: `up` (rank 0 -> agent: metric rows in
  batches of up to 20 ms, acks, progress) and `down` (agent -> rank 0: live commands, cancel),
  carrying the run-process pipe's message types (workers/pipe.py). In rank 0 they back a
  `MetricsSink` and a plain `ControlInbox` (fed by a reader thread), so the loop sees
  exactly what it sees in one process and stays free of gRPC. In the agent one bridge
  thread moves `up` into the agent's own sink/inbox/progress (the Outbox, so batching,
  resend and ordering stay the agent's) and forwards whatever the agent's inbox receives
  (polled every 10 ms) down. Commands already waiting when the run starts (scheduled,
  replayed, pending live ones) go to rank 0 as launch arguments, so a resumed run drops
  the ones its checkpoint already holds before its first step, as in one process.
  Only rank 0 has a bridge; the other ranks get a null sink and an empty inbox, and learn
  commands and cancel from rank 0's broadcast at each step boundary.
  Queues rather than a Manager: no extra server process, and rows cross with one pickle.
* **The launcher runs in a helper thread** of the agent: torch installs its own SIGTERM
  handler when launched from the main thread, which would replace the agent's (SIGTERM
  = hand the run back). The agent's main thread waits for it.
* **Outcome**: each rank returns a `pipe.Done` (completed with the summary, cancelled with
  the reason, failed with the message); rank 0's is turned back into `Summary`, `Cancelled` or
  `TrainingError` for the agent, so its state handling is the same as in one process.
  A rank that crashes makes the launcher stop all ranks (max_restarts=0: restarts are the
  server's job, from the last checkpoint) and is reported with its error.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
import time
from typing import Any, Callable, Optional

from trainctl.workers.pipe import Acked, Cancel, Checkpointed, Control, Done, Note, Progress, relay
from trainctl.workers.run_process import BatchingSink, tune_malloc
from trainctl.workers.runner import forkserver

log = logging.getLogger(__name__)

MASTER_ENV = "TRAINCTL_DDP_MASTER"
TRACE_ENV = "TRAINCTL_DDP_TRACE"  # test hook, see engine/distributed.py
_STOP = ("stop",)


def launch_config(nproc: int, nnodes: int = 1, *, master: Optional[str] = None, node_rank: int = 0,
                  run_id: str = "trainctl"):
    from torch.distributed.launcher.api import LaunchConfig

    from trainctl.workers.engine.loop import TrainingError

    if nnodes == 1:
        rdzv = {"rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0"}
    elif not master:
        raise TrainingError(f"resources.nnodes: {nnodes} nodes need {MASTER_ENV}=host:port on the worker "
                            "(this node is node 0; the others join with python -m trainctl.workers.ddp)")
    else:
        rdzv = {"rdzv_backend": "static", "rdzv_endpoint": master, "rdzv_configs": {"rank": node_rank}}
    return LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc,
                        run_id=run_id, max_restarts=0,
                        start_method="forkserver", monitor_interval=0.1, **rdzv)


# ---------------------------------------------------------------------- in the agent


def run_ddp(spec, ctx, *, on_rows: Optional[Callable[[list[tuple]], None]] = None, master: Optional[str] = None,
            trace_dir: Optional[str] = None):
    """Train `spec` on resources.nproc ranks (x nnodes); `ctx` is the agent's
    TrainingContext, served by rank 0 through the bridge. Rank 0's row batches go to
    `on_rows` as they arrive (as from `run_in_process`), or row by row to `ctx.sink`.
    Returns rank 0's Summary; raises Cancelled / TrainingError like `Trainer.run`."""
    from torch.distributed.launcher.api import elastic_launch

    from trainctl.workers.engine.loop import Cancelled, Summary, TrainingError

    if ctx.inbox.cancelled:
        raise Cancelled(ctx.inbox.cancel_reason)
    res = spec.resources
    config = launch_config(res.nproc, res.nnodes, master=master or os.environ.get(MASTER_ENV))
    mp = forkserver()
    up, down = mp.Queue(), mp.Queue()
    waiting = ctx.inbox.due(sys.maxsize)  # scheduled ones keep their at_step
    bridge = threading.Thread(target=_pump, args=(ctx, up, down, on_rows), name="ddp-bridge", daemon=True)
    bridge.start()
    outcome: dict[str, Any] = {}

    def launch() -> None:
        try:
            outcome["ranks"] = elastic_launch(config, _rank_main)(
                spec.to_dict(), ctx.checkpoint_dir, waiting, up, down, trace_dir or os.environ.get(TRACE_ENV),
                ctx.lineage)
        except BaseException as exc:  # ChildFailedError, rendezvous errors
            outcome["error"] = exc

    launcher = threading.Thread(target=launch, name="ddp-launcher", daemon=True)
    launcher.start()
    while launcher.is_alive():
        launcher.join(0.2)
    # Rank 0 has exited, so everything it put is in the pipe ahead of this marker.
    up.put(_STOP)
    bridge.join(10)
    down.cancel_join_thread()
    for q in (up, down):
        q.close()

    if "error" in outcome:
        raise TrainingError(f"DDP run failed: {_failure_text(outcome['error'])}")
    done: Done = outcome["ranks"][0]
    if done.outcome == "completed":
        return Summary.from_dict(done.payload)
    if done.outcome == "cancelled":
        raise Cancelled(done.payload)
    raise TrainingError(done.payload)


def _pump(ctx, up, down, on_rows) -> None:
    """Agent side of the bridge: rank 0's rows/acks/progress in, live commands and
    cancel out."""
    cancel_sent = False

    def to_sink(rows) -> None:  # no agent outbox (tests, in-process use): the context's sink
        for scope, step, epoch, _wall_time, values in rows:
            ctx.sink.log(scope, step, epoch, values)

    while True:
        try:
            msg = up.get(timeout=0.01)
        except queue.Empty:
            msg = None
        if msg == _STOP:
            return
        try:
            if msg is not None:
                if not relay(msg, ctx, on_rows or to_sink):
                    raise TypeError(f"unknown message from rank 0: {msg!r}")
            for cmd in ctx.inbox.due(sys.maxsize):
                down.put(Control(cmd))
            if ctx.inbox.cancelled and not cancel_sent:
                down.put(Cancel(ctx.inbox.cancel_reason))
                cancel_sent = True
        except Exception:  # never let one bad message stop the metrics
            log.exception("ddp bridge: dropped %r", msg)


def _failure_text(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)
    if failures:
        rank, failure = min(failures.items())
        return f"rank {rank} exited with {failure.exitcode}: {failure.message}".strip()
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------- in each rank


def _receive(down, inbox) -> None:
    while True:
        try:
            msg = down.get()
        except (EOFError, OSError):
            return
        if isinstance(msg, Control):
            inbox.put(msg.command)
        elif isinstance(msg, Cancel):
            inbox.cancel(msg.reason)


def _exit_with_parent() -> None:
    """A rank whose launcher died (agent killed) stops instead of training on alone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _rank_main(spec_dict: dict, checkpoint_dir: Optional[str], commands: list, up, down,
               trace_dir: Optional[str] = None, lineage=None):
    """The elastic launcher's entrypoint, run in every rank. Every rank picks its resume
    checkpoint with the same `lineage` (None on the other nodes of a multi-node run,
    which then need the same directory contents; the loop checks that ranks agree)."""
    import torch

    from trainctl.spec import parse_spec
    from trainctl.workers.engine.context import ControlInbox, TrainingContext
    from trainctl.workers.engine.distributed import RankContext
    from trainctl.workers.engine.loop import Cancelled, Trainer, TrainingError, pick_device

    _exit_with_parent()
    tune_malloc()
    try:
        spec = parse_spec(spec_dict, check_model=False)
        device = pick_device(spec.train.device)
    except (TrainingError, ValueError) as exc:
        return Done("failed", str(exc))
    if device.type == "cpu":  # ranks share the cores: no oversubscribed thread pools
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    rank = RankContext.start(device, trace_dir=trace_dir)
    try:
        ctx = TrainingContext(checkpoint_dir=checkpoint_dir, lineage=lineage)
        if rank.is_main and up is not None:
            inbox = ControlInbox(on_ack=lambda ack: up.put(Acked(ack)))
            for cmd in commands:
                inbox.put(cmd)
            threading.Thread(target=_receive, args=(down, inbox), name="ddp-inbox", daemon=True).start()
            ctx = TrainingContext(sink=BatchingSink(up.put), inbox=inbox, checkpoint_dir=checkpoint_dir,
                                  lineage=lineage, on_progress=lambda step: up.put(Progress(step)),
                                  on_note=lambda text: up.put(Note(text)),
                                  on_checkpoint=lambda path, step: up.put(Checkpointed(path, step)))
        try:
            summary = Trainer(spec, ctx, dist=rank).run()
        except Cancelled as exc:
            return Done("cancelled", str(exc))
        except (TrainingError, ValueError, FileNotFoundError) as exc:
            return Done("failed", str(exc))
        return Done("completed", summary.as_dict())
    finally:
        rank.close()


# ---------------------------------------------------------------------- other nodes


def main(argv: Optional[list[str]] = None) -> int:
    """Join a multi-node run as node K (node 0 is the trainctl worker that got it)."""
    from torch.distributed.launcher.api import elastic_launch

    from trainctl.spec import load_spec_file, parse_spec

    ap = argparse.ArgumentParser(prog="python -m trainctl.workers.ddp", description=main.__doc__)
    ap.add_argument("spec", help="the experiment's spec file (YAML or JSON)")
    ap.add_argument("--node-rank", type=int, required=True)
    ap.add_argument("--master", required=True, help="host:port of node 0 (its TRAINCTL_DDP_MASTER)")
    ap.add_argument("--checkpoint-dir", default=None, help="the same (shared) directory node 0 uses")
    args = ap.parse_args(argv)
    spec = parse_spec(load_spec_file(args.spec), check_model=False)
    config = launch_config(spec.resources.nproc, spec.resources.nnodes, master=args.master,
                           node_rank=args.node_rank)
    elastic_launch(config, _rank_main)(spec.to_dict(), args.checkpoint_dir, [], None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
