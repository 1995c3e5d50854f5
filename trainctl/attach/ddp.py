"""DDP: every rank calls `trainctl.init`; rank 0 talks to the server; all ranks apply a
command at the same step.

Ranks learn of commands only from rank 0, through a collective, so they must meet at
the same steps: every `every`-th `run.step()` (steps 0, every, 2*every, ...) is a sync
point where rank 0 broadcasts how many commands arrived since the last one (and whether
the run was cancelled); only when that count is non-zero do the commands themselves
follow (serialized protobuf). Every rank then applies them at that same step, so the
optimizers stay identical. Between sync points a step costs one modulo; at a sync point,
one broadcast of a 2-element tensor (gloo, on a group of its own so an NCCL job pays no
device sync). A command waits at most `every` steps: that is the price of not meeting
every step (bench/attach_step.py --ddp measures both).

The group is created in `trainctl.init`, which is why every rank must call it, in the
same order relative to other collectives.
"""
from __future__ import annotations

import sys
from collections import deque

from trainctl.v1 import trainctl_pb2 as pb

DEFAULT_EVERY = 16


def world() -> tuple[int, int]:
    """(rank, world size) of an initialized torch.distributed job, else (0, 1). Never
    imports torch: a DDP script has imported torch.distributed already."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class RankSync:
    def __init__(self, every: int = DEFAULT_EVERY):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"sync_every: {every!r} must be an integer >= 1")
        import torch
        import torch.distributed as dist
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.every = every
        # A CPU (gloo) group of its own: the header is a CPU tensor whatever the job's backend.
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.header = torch.zeros(2, dtype=torch.int64)  # [commands that follow, cancelled]

    def exchange(self, incoming: deque, cancelled: bool) -> tuple[list, bool]:
        """At a sync point (every rank, same step): rank 0's commands since the last one,
        on every rank; and whether rank 0's run was cancelled."""
        cmds: list = []
        if self.rank == 0:
            cmds = [incoming.popleft() for _ in range(len(incoming))]
            self.header[0], self.header[1] = len(cmds), int(cancelled)
        self.dist.broadcast(self.header, src=0, group=self.group)
        n, stop = int(self.header[0]), bool(self.header[1])
        if not n:
            return [], stop
        payload = [[(isinstance(c, pb.ControlRecord), c.SerializeToString()) for c in cmds]] if self.rank == 0 \
            else [None]
        self.dist.broadcast_object_list(payload, src=0, group=self.group)
        return [(pb.ControlRecord if rec else pb.ControlCommand).FromString(b) for rec, b in payload[0]], stop


class NoSession:
    """Ranks other than 0: nothing goes to the server (rank 0 reports the run)."""
    experiment_id = 0
    cancelled = ""

    def ack(self, *a) -> None:
        pass

    def declare_knobs(self) -> None:
        pass

    def wait_attached(self, timeout: float) -> bool:
        return False

    def finish(self, *a) -> list[str]:
        return []
