"""A tiny Hugging Face Trainer run, steerable with one callback.

A 2-layer BERT with 32-wide hidden states, randomly initialised from a BertConfig (nothing
downloaded), learns a synthetic task on CPU in seconds: does a sequence hold more low
tokens than high ones? The Trainer's own AdamW and linear-decay schedule (with warmup)
are attached. While it runs:

    trainctl set-lr ID 1e-3          # the linear schedule keeps its shape, x one constant
    trainctl scale-lr ID 0.5

Run:  HF_HUB_OFFLINE=1 TRAINCTL_SERVER=localhost:50051 python examples/attach/hf_trainer.py
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from trainctl.integrations.transformers import TrainctlCallback

VOCAB, LENGTH = 64, 16


class Synthetic(torch.utils.data.Dataset):
    """Random token sequences; label 1 when more than half the tokens are below VOCAB / 2."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, VOCAB, (n, LENGTH), generator=g)
        self.labels = ((self.ids < VOCAB // 2).sum(1) > LENGTH // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": self.labels[i]}


class Slow(TrainerCallback):
    """--step-delay: sleep after each step, to watch (and steer) the run in slow motion."""

    def __init__(self, delay: float):
        self.delay = delay

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.delay)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="hf-trainer")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     max_position_embeddings=LENGTH, num_labels=2))
    callbacks = [TrainctlCallback(name=args.name, config=vars(args), tags=["example", "transformers"])]
    if args.step_delay:
        callbacks.append(Slow(args.step_delay))
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=os.path.join(out, "hf"), num_train_epochs=args.epochs,
                                  per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128,
                                  learning_rate=args.lr, warmup_steps=5, lr_scheduler_type="linear",
                                  logging_steps=1, eval_strategy="epoch", save_strategy="no", report_to=[],
                                  use_cpu=True, disable_tqdm=True, seed=args.seed, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=Synthetic(args.train_size, args.seed),
                          eval_dataset=Synthetic(256, args.seed + 1), callbacks=callbacks)
        trainer.train()
    print(f"done: experiment {callbacks[0].run.id}, {trainer.state.global_step} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
