"""A plain PyTorch loop made steerable with four lines of the attach SDK.

A small MLP on sklearn's bundled digits (nothing downloaded), CPU, a few seconds;
MultiStepLR halves the LR at half the epochs (the "gamma 0.5 at epoch 100 of 200"
recipe, shortened). While it runs:

    trainctl ls                        # the run is listed (kind attached)
    trainctl set-lr ID 0.05            # the schedule keeps its shape, x one constant
    trainctl set ID dropout 0.2        # a knob, by name
    trainctl metrics ID

Run:  TRAINCTL_SERVER=localhost:50051 python examples/attach/plain_loop.py --epochs 20
"""
from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits

import trainctl


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="plain-loop")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (to watch it in slow motion)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replay", type=int, default=0, help="re-apply experiment ID's commands at the same steps")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x))
    train, val = perm[:1500], perm[1500:]
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.0),
                                torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = (len(train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[args.epochs // 2 * steps_per_epoch], gamma=0.5)

    with trainctl.init(name=args.name, config=args, tags=["example"], replay=args.replay) as run:  # 1: register
        run.attach(opt, sched)                                                # 2: steerable LR/WD
        dropout = run.knob("dropout", 0.0, low=0.0, high=0.9)                 # a knob of our own
        for epoch in range(args.epochs):
            model.train()
            for idx in train[torch.randperm(len(train))].split(args.batch_size):
                run.step()                                                    # 3: step boundary
                model[2].p = dropout.value
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()  # per step: milestones are in steps
                run.log(loss=loss.detach())                                   # 4: metrics (tensors ok)
                if args.step_delay:
                    time.sleep(args.step_delay)
            model.eval()
            with torch.no_grad():
                acc = (model(x[val]).argmax(1) == y[val]).float().mean()
            run.log_epoch(val_acc=acc)
    print(f"done: experiment {run.id}, {run.step_count + 1} steps, val_acc {float(acc):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
