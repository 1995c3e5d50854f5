"""DDP with the attach SDK: 2 real CPU ranks (gloo). Every rank calls trainctl.init;
rank 0 alone holds the session; a command that reaches rank 0 is applied by EVERY rank
at the SAME step (the next sync point), so the replicas stay identical; a cancel is seen
by every rank at the same step (else the next all-reduce would hang)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import json, os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import trainctl
from trainctl.v1 import trainctl_pb2 as pb

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
torch.set_num_threads(1)
model = DDP(torch.nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
# Nothing listens there: rank 0's session keeps retrying, which is all this test needs
# (the command is handed to rank 0 as its session would: appended to its command queue).
run = trainctl.init(name="ddp", server="127.0.0.1:1", sync_every=8)
run.attach(opt)
assert (run.rank == rank) and (rank == 0) == (type(run._session).__name__ == "Session")
x = torch.randn(16, 8) + rank
lrs, stopped = [], None
for i in range(200):
    run.step()
    if run.cancelled:
        stopped = i
        break
    if rank == 0 and i == 21:  # arrives on rank 0 only, between sync points
        run._incoming.append(pb.ControlCommand(command_id="c1", kind=pb.SCALE_LR, value=0.5))
    if rank == 0 and i == 50:
        run._session.cancelled = "cancelled by a client"
    loss = model(x).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    lrs.append(opt.param_groups[0]["lr"])
print(json.dumps({"rank": rank, "lrs": lrs, "stopped": stopped, "rows": len(run._rows),
                  "w": [float(v) for v in model.module.weight.flatten()]}), flush=True)
run.finish(timeout=1)
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_apply_a_command_at_the_same_step_and_stop_together(tmp_path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=str(tmp_path)))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank hung (ranks out of step?)")
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    r0, r1 = sorted(outs, key=lambda o: o["rank"])
    changed = [next(i for i, lr in enumerate(o["lrs"]) if lr != 0.1) for o in (r0, r1)]
    assert changed[0] == changed[1] == 24  # the first sync point (every 8 steps) after step 21
    assert r0["lrs"] == r1["lrs"] and r0["lrs"][24] == pytest.approx(0.05)
    assert r0["w"] == r1["w"]  # the replicas stayed identical
    assert r0["stopped"] == r1["stopped"] == 56  # cancel seen by both at the next sync point
    assert r1["rows"] == 0  # only rank 0 keeps (and sends) rows
