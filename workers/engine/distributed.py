"""What one rank of a DDP run knows about the others: the loop's only view of torch.distributed.

`RankContext()` (the default) is a single process: every method is a no-op or a local
answer, so `Trainer` reads the same with or without DDP. `RankContext.start(device)`
joins the process group the elastic launcher set up (env:// variables: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT); it never makes its own rendezvous.

Three things cross ranks, each chosen so no rank can drift from the others:

* Control commands (`due_commands`): rank 0 owns the inbox. At each step boundary it
  broadcasts a 2-element int64 header [number of due commands, cancelled]; only when the
  header is non-zero does a `broadcast_object_list` follow with the commands (and the
  cancel reason). Every rank applies the same commands before the same step; only
  rank 0 acks. The header goes over a gloo group even when training uses NCCL, so the
  per-step check is a CPU round trip and never a GPU sync.
* Metrics (`all_sum`): StepStats sums the device tensors it holds over ranks in one
  all_reduce per drain (every step on CPU, every 16 on GPU), not one per step.
* Per-epoch values (`share`): rank 0's object (the validation row) goes to all ranks, so
  plateau schedules and "best epoch" decide the same everywhere.

`trace` is a test hook: given a trace dir (`run_ddp(trace_dir=)`, or TRAINCTL_DDP_TRACE
in the agent's environment) every rank appends JSON lines to <dir>/rank<r>.jsonl: its LR,
local loss and applied commands per step, its checkpoint writes (reading a loss to
write it is a host sync: tests only).
"""
from __future__ import annotations

import datetime
import json
import os
from contextlib import nullcontext
from typing import Any, Optional

import torch
import torch.distributed as dist



class RankContext:
    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: Optional[torch.device] = None, control_group=None, enabled: bool = False,
                 trace_dir: Optional[str] = None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device
        self.enabled = enabled            # inside a process group (even a world of 1)
        self._control = control_group     # gloo group for headers and objects (None: default)
        self._trace = None
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            self._trace = open(os.path.join(trace_dir, f"rank{rank}.jsonl"), "a", buffering=1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, device: torch.device, timeout_s: float = 1800, trace_dir: Optional[str] = None) -> "RankContext":
        """Join the process group set up by the elastic launcher (env://). gloo on CPU,
        nccl on CUDA (each rank on cuda:LOCAL_RANK), plus a gloo group for control."""
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        timeout = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
            control = dist.new_group(backend="gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
            control = None
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, device, control, enabled=True,
                   trace_dir=trace_dir)

    def close(self) -> None:
        if self._trace:
            self._trace.close()
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module used for training forwards: DDP over `model` (which stays the plain
        module for checkpoints, EMA and evaluation), or `model` itself."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @staticmethod
    def no_sync(module: torch.nn.Module, last: bool):
        """For gradient accumulation: skip DDP's gradient all-reduce on all but the last
        micro-batch of a step."""
        return nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync()

    # ------------------------------------------------------------------ control
    def due_commands(self, inbox, step: int) -> tuple[list, Optional[str]]:
        """(commands to apply before `step`, cancel reason or None), the same on every
        rank; read from rank 0's inbox."""
        if not self.enabled:
            if inbox.cancelled:
                return [], inbox.cancel_reason
            return inbox.due(step), None
        header = torch.zeros(2, dtype=torch.int64)
        commands: list = []
        if self.is_main:
            cancelled = inbox.cancelled
            commands = [] if cancelled else inbox.due(step)
            header[0], header[1] = len(commands), int(cancelled)
        dist.broadcast(header, src=0, group=self._control)
        count, cancelled = header.tolist()
        if not count and not cancelled:
            return [], None
        payload = [(commands, inbox.cancel_reason) if self.is_main else None]
        dist.broadcast_object_list(payload, src=0, group=self._control)
        commands, reason = payload[0]
        return commands, (reason if cancelled else None)

    # ------------------------------------------------------------------ values
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over ranks, on t's device (one collective)."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def all_finite(self, t: torch.Tensor) -> bool:
        """Whether `t` is finite on every rank (the `on_nonfinite: skip` decision must
        be the same everywhere, or ranks would diverge)."""
        ok = torch.isfinite(t).all().to(torch.int32).reshape(1)
        if self.enabled:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def agree(self, value: Any) -> bool:
        """Whether every rank holds the same `value` (the same answer on every rank)."""
        if not self.enabled:
            return True
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value, group=self._control)
        return all(v == values[0] for v in values)

    # ------------------------------------------------------------------ test hook
    def trace(self, kind: str, **fields: Any) -> None:
        if self._trace is None:
            return
        fields = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
        self._trace.write(json.dumps({"kind": kind, "rank": self.rank, **fields}) + "\n")
