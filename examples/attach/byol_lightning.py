"""BYOL-style self-supervised training under PyTorch Lightning, steerable with one callback.

An online network (encoder + projector + predictor) learns to predict a target network's
projection of another view of the same image; the target is an exponential moving average
of the online network with decay tau, which follows a cosine from tau_base to 1 over the
run (the BYOL paper's schedule). tau_base is a knob: `trainctl set ID tau 0.999` changes the
base, and tau goes on along the cosine from the new base:

    tau(k) = 1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2

Small MLPs on sklearn's bundled digits (nothing downloaded), CPU, seconds. While it runs:

    trainctl set-lr ID 0.02          # the cosine LR schedule keeps its shape, x one constant
    trainctl set ID tau 0.999        # the EMA's base decay

Run:  TRAINCTL_SERVER=localhost:50051 python examples/attach/byol_lightning.py --epochs 5
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from trainctl.integrations.lightning import TrainctlCallback


def mlp(i: int, h: int, o: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(i, h), torch.nn.BatchNorm1d(h), torch.nn.ReLU(), torch.nn.Linear(h, o))


def augment(x: torch.Tensor) -> torch.Tensor:
    """Two cheap views of an 8x8 digit: random pixel dropout plus noise."""
    keep = (torch.rand_like(x) > 0.2).float()
    return x * keep + 0.1 * torch.randn_like(x)


class BYOL(pl.LightningModule):
    def __init__(self, lr: float, total_steps: int, tau_base, step_delay: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["tau_base"])
        self.online = torch.nn.ModuleDict({"encoder": mlp(64, 128, 64), "projector": mlp(64, 64, 32)})
        self.predictor = mlp(32, 64, 32)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.tau_base = tau_base  # a callable: the knob's current value
        self.tau = float("nan")

    def _online(self, x):
        return self.predictor(self.online["projector"](self.online["encoder"](x)))

    def _target(self, x):
        with torch.no_grad():
            return self.target["projector"](self.target["encoder"](x))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        v1, v2 = augment(x), augment(x)
        loss = (2 - 2 * F.cosine_similarity(self._online(v1), self._target(v2), dim=-1)).mean() \
            + (2 - 2 * F.cosine_similarity(self._online(v2), self._target(v1), dim=-1)).mean()
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # After the optimizer step: the target follows the online network with decay tau.
        k, total = self.trainer.global_step, self.hparams.total_steps
        self.tau = 1 - (1 - self.tau_base()) * (math.cos(math.pi * min(k, total) / total) + 1) / 2
        with torch.no_grad():
            for t, o in zip(self.target.parameters(), self.online.parameters()):
                t.mul_(self.tau).add_(o, alpha=1 - self.tau)
        self.log("tau", self.tau, on_step=True, on_epoch=False)
        if self.hparams.step_delay:
            time.sleep(self.hparams.step_delay)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        z = F.normalize(self.online["encoder"](x), dim=-1)
        # Nearest class centroid in the batch's own embedding: a cheap probe of the features.
        cent = F.normalize(torch.stack([z[y == c].mean(0) if (y == c).any() else torch.zeros_like(z[0])
                                        for c in range(10)]), dim=-1)
        self.log("val_centroid_acc", ((z @ cent.T).argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(list(self.online.parameters()) + list(self.predictor.parameters()),
                              lr=self.hparams.lr, momentum=0.9, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="byol-lightning")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--tau-base", type=float, default=0.99)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (to watch it in slow motion)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    pl.seed_everything(args.seed, verbose=False)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x))
    train = DataLoader(TensorDataset(x[perm[:1500]]), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[perm[1500:]], y[perm[1500:]]), batch_size=300)

    cb = TrainctlCallback(name=args.name, config=args, tags=["example", "lightning"],
                          knobs={"tau": (args.tau_base, 0.0, 1.0)})
    model = BYOL(args.lr, total_steps=args.epochs * len(train), tau_base=lambda: cb.knob("tau"),
                 step_delay=args.step_delay)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(model, train, val)
    print(f"done: experiment {cb.run.id}, {trainer.global_step} steps, tau {model.tau:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
