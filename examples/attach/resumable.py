"""A plain PyTorch loop that survives losing its machine: a checkpoint at every epoch's
end goes to the server's artifact store (`run.save_checkpoint`), and a restarted
attempt, on whichever worker picks it up, continues from it (`run.load_checkpoint`).

Submitted as code (`trainctl submit examples/code/resumable.yaml --code examples/attach`),
a worker killed mid-run costs at most the epoch in progress: the run is requeued, the
next worker fetches the last checkpoint the server has and the loop goes on from its
step. The SDK restores its own state with it (step counter, applied LR/knob commands),
so the stored history has every step once. Data order is a pure function of (seed,
epoch), so the resumed run sees the batches the uninterrupted one would have.

Run attached (no worker) it behaves the same, without anything to resume:
    TRAINCTL_SERVER=localhost:50051 python examples/attach/resumable.py --epochs 5
"""
from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits

import trainctl


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="resumable")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (to watch it, or kill it)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x))
    train, val = perm[:1500], perm[1500:]
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps_per_epoch = (len(train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)

    with trainctl.init(name=args.name, config=args, tags=["example", "resumable"]) as run:
        run.attach(opt, sched)
        start = 0
        ckpt = run.load_checkpoint()          # None on a first attempt (or with nothing saved)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            start = ckpt["epoch"] + 1
            print(f"resumed at epoch {start} (step {run.step_count + 1}), attempt resumed={run.resumed}", flush=True)
        for epoch in range(start, args.epochs):
            model.train()
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
            for idx in train[order].split(args.batch_size):
                run.step()
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                run.log(loss=loss.detach())
                if args.step_delay:
                    time.sleep(args.step_delay)
            model.eval()
            with torch.no_grad():
                acc = float((model(x[val]).argmax(1) == y[val]).float().mean())
            run.log_epoch(val_acc=acc)
            # After the epoch row: a resume from here never repeats or skips a row.
            run.save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict(), "epoch": epoch})
            print(f"epoch {epoch}: val_acc {acc:.3f}, checkpoint saved", flush=True)
    print(f"done: experiment {run.id}, {run.step_count + 1} steps", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
