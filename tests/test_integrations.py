"""The Lightning and Hugging Face callbacks (trainctl/integrations/) against a real server.

- The two examples run as subprocesses against a real server process and are steered
  mid-run with the real CLI: each command is acknowledged APPLIED at a step, the run ends
  COMPLETED with every step stored once, and the steered value follows the rule from the
  applied step on (the LR = an unsteered copy of the same scheduler x one constant; the
  BYOL tau = the cosine from the new base).
- In-process (the callbacks in this process, the server a real one): gradient accumulation
  (one step per optimizer step), an epoch-interval scheduler steered, an exception FAILED,
  Ctrl-C CANCELLED, `trainctl cancel` stopping the Trainer.
Skipped, with the reason, when lightning / transformers are not installed."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import Cluster
from trainctl.client import Client

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, ever

needs_lightning = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("lightning"), reason="lightning is not installed (pip install lightning)")
needs_transformers = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("transformers"),
    reason="transformers is not installed (pip install transformers accelerate)")


# ---------------------------------------------------------------------- helpers
def _example(name: str, address: str, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TRAINCTL_SERVER": address, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TRAINCTL_TOKEN", None)
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / "attach" / name), *args], env=env, cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _cli(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainctl.client.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "TRAINCTL_SERVER": address}, timeout=60)


def _wait_running(client: Client, name: str, min_step: int, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for x in client.list():
            if x.name == name and x.last_step >= min_step:
                return x
        time.sleep(0.1)
    raise TimeoutError(f"run {name!r} never reached step {min_step}")


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    rc = proc.wait(timeout)
    out = log.read_text()
    assert rc == 0, out
    assert "not delivered" not in out, out
    return out


def _steer(address: str, *args: str) -> None:
    r = _cli(address, *args)
    assert r.returncode == 0 and "applied at step" in r.stdout, r.stdout + r.stderr


def _lrs(make_sched, lr: float, steps: int) -> list[float]:
    """The LR an unsteered copy of the schedule gives before each of `steps` steps."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_sched(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _by_name(client: Client, name: str):
    (x,) = [e for e in client.list() if e.name == name]
    return x


# ---------------------------------------------------------------------- the examples, real processes
@needs_lightning
def test_byol_lightning_example_steered_lr_and_tau_from_the_cli(tmp_path):
    c = Cluster(tmp_path)
    log = tmp_path / "byol.log"
    epochs, per_epoch = 3, 24  # 1500 digits / batch 64
    steps = epochs * per_epoch
    proc = _example("byol_lightning.py", c.address, log, "--name", "byol", "--epochs", str(epochs),
                    "--step-delay", "0.05")
    try:
        client = c.client()
        run = _wait_running(client, "byol", 5)
        assert run.kind == "ATTACHED"
        _steer(c.address, "set-lr", str(run.id), "0.02")
        _steer(c.address, "set", str(run.id), "tau", "0.999")
        _finish(proc, log)
        x = client.get(run.id)
        assert x.state == "COMPLETED", x
        assert {k["name"]: k["value"] for k in x.knobs}["tau"] == 0.999
        cmds = {r.kind: r for r in client.controls(run.id)}
        lr_cmd, tau_cmd = cmds["SET_LR"], cmds["SET_KNOB"]
        assert lr_cmd.status == tau_cmd.status == "APPLIED"
        assert (tau_cmd.old_value, tau_cmd.new_value) == (0.99, 0.999)
        m = client.metrics(run.id)
        for name in ("train_loss", "tau", "lr"):
            assert m[f"STEP/{name}"]["step"] == list(range(steps)), name  # every optimizer step, once
        assert m["EPOCH/val_centroid_acc"]["epoch"] == list(range(epochs))
        # LR: the unsteered cosine (stepped by Lightning per step) x one constant from the applied step.
        own = _lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps), 0.05, steps)
        s = lr_cmd.applied_step
        assert 0 < s < steps - 5
        want = [own[k] if k < s else own[k] * 0.02 / own[s] for k in range(steps)]
        assert m["STEP/lr"]["value"] == pytest.approx(want, rel=1e-9)
        # tau after step k (global_step k+1): the cosine from the base in force at that step.
        t = tau_cmd.applied_step
        assert 0 < t < steps - 5

        def tau(k: int, base: float) -> float:
            return 1 - (1 - base) * (math.cos(math.pi * (k + 1) / steps) + 1) / 2
        want = [tau(k, 0.99 if k < t else 0.999) for k in range(steps)]
        assert m["STEP/tau"]["value"] == pytest.approx(want, rel=1e-6)  # logged by Lightning as float32
    finally:
        if proc.poll() is None:
            proc.kill()
        c.stop()


@needs_transformers
def test_hf_trainer_example_steered_from_the_cli(tmp_path):
    from transformers import get_linear_schedule_with_warmup
    c = Cluster(tmp_path)
    log = tmp_path / "hf.log"
    epochs, per_epoch = 2, 32  # 512 sequences / batch 16
    steps = epochs * per_epoch
    proc = _example("hf_trainer.py", c.address, log, "--name", "hf", "--epochs", str(epochs),
                    "--step-delay", "0.05")
    try:
        client = c.client()
        run = _wait_running(client, "hf", 8)  # past the 5 warmup steps
        _steer(c.address, "set-lr", str(run.id), "0.001")
        _finish(proc, log)
        x = client.get(run.id)
        assert x.state == "COMPLETED" and x.kind == "ATTACHED", x
        (cmd,) = client.controls(run.id)
        assert cmd.status == "APPLIED" and cmd.new_value == pytest.approx(0.001)
        m = client.metrics(run.id)
        for name in ("loss", "grad_norm", "lr"):
            assert m[f"STEP/{name}"]["step"] == list(range(steps)), name
        assert m["EPOCH/eval_loss"]["epoch"] == list(range(epochs))
        own = _lrs(lambda o: get_linear_schedule_with_warmup(o, 5, steps), 5e-4, steps)
        s = cmd.applied_step
        assert 5 <= s < steps - 5
        want = [own[k] if k < s else own[k] * 0.001 / own[s] for k in range(steps)]
        assert m["STEP/lr"]["value"] == pytest.approx(want, rel=1e-9)
    finally:
        if proc.poll() is None:
            proc.kill()
        c.stop()


# ---------------------------------------------------------------------- in-process, real server
def _steer_when(cb, at_step: int, action, timeout: float = 60) -> threading.Thread:
    """From another thread, once the callback's run is registered and past `at_step`:
    action(run_id) (what a user at a terminal would do mid-run)."""
    errors: list = []

    def go():
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                run = cb.run
                if run is not None and run.id and run.step_count >= at_step:
                    return action(run.id)
                time.sleep(0.02)
            errors.append("the run never reached the step")
        except Exception as exc:  # noqa: BLE001 — surfaced by the test below
            errors.append(exc)
    t = threading.Thread(target=go, daemon=True)
    t.errors = errors
    t.start()
    return t


def _tiny_lightning(fail_at: int = -1, interrupt_at: int = -1, delay: float = 0.0, sched: str = "epoch"):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == fail_at:
                raise ValueError(f"bad batch at step {fail_at}\nsecond line")
            if self.trainer.global_step == interrupt_at:
                raise KeyboardInterrupt
            (x,) = batch
            loss = self.net(x).pow(2).mean()
            self.log("mse", loss, on_step=True, on_epoch=True)
            if delay:
                time.sleep(delay)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=1e-3)
            s = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": sched}}

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=4)
    return Tiny(), data  # 16 batches per epoch


def _trainer(cb, **kw):
    import lightning.pytorch as pl
    return pl.Trainer(accelerator="cpu", devices=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("integrations"))
    yield c
    c.stop()


@needs_lightning
def test_lightning_accumulation_one_step_per_optimizer_step_and_an_epoch_scheduler_steered(server):
    from trainctl.integrations.lightning import TrainctlCallback
    cb = TrainctlCallback("acc-epoch", server=server.address, knobs={"noise": (0.5, 0.0, 1.0)})
    model, data = _tiny_lightning(delay=0.01)
    client = server.client()
    t = _steer_when(cb, 10, lambda i: (client.set_lr(i, 0.3), client.set(i, "noise", 0.25)))
    _trainer(cb, max_epochs=3, accumulate_grad_batches=2).fit(model, data)
    t.join(30)
    assert not t.errors, t.errors
    x = _by_name(client, "acc-epoch")
    assert x.state == "COMPLETED", x
    steps, per_epoch = 24, 8  # 16 batches / 2 accumulated = 8 optimizer steps per epoch
    m = client.metrics(x.id)
    assert m["STEP/mse_step"]["step"] == m["STEP/loss"]["step"] == list(range(steps))
    assert m["EPOCH/mse_epoch"]["epoch"] == [0, 1, 2]
    assert "STEP/mse_epoch" not in m and "EPOCH/mse_step" not in m
    cmds = {c.kind: c for c in client.controls(x.id)}
    assert cmds["SET_LR"].status == cmds["SET_KNOB"].status == "APPLIED"
    assert cb.knob("noise") == 0.25
    # StepLR stepped by Lightning once per epoch ("interval": "epoch"), steered x one constant.
    s = cmds["SET_LR"].applied_step
    own = [0.1 * 0.5 ** (k // per_epoch) for k in range(steps)]
    want = [own[k] if k < s else own[k] * 0.3 / own[s] for k in range(steps)]
    assert m["STEP/lr"]["value"] == pytest.approx(want, rel=1e-9)


@needs_lightning
def test_lightning_exception_fails_the_run_with_its_reason_and_keeps_the_rows(server):
    from trainctl.integrations.lightning import TrainctlCallback
    cb = TrainctlCallback("lit-boom", server=server.address)
    model, data = _tiny_lightning(fail_at=5)
    with pytest.raises(ValueError, match="bad batch"):
        _trainer(cb, max_epochs=1).fit(model, data)
    client = server.client()
    x = _by_name(client, "lit-boom")
    assert x.state == "FAILED" and x.message == "ValueError: bad batch at step 5", x
    assert client.metrics(x.id)["STEP/loss"]["step"] == [0, 1, 2, 3, 4]


@needs_lightning
def test_lightning_ctrl_c_cancels_the_run(server):
    import signal
    from trainctl.integrations.lightning import TrainctlCallback
    cb = TrainctlCallback("lit-int", server=server.address)
    model, data = _tiny_lightning(interrupt_at=3)
    old = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown ends in sys.exit(1)
            _trainer(cb, max_epochs=1).fit(model, data)
    finally:
        signal.signal(signal.SIGINT, old)  # Lightning ignores SIGINT from then on
    x = _by_name(server.client(), "lit-int")
    assert x.state == "CANCELLED", x


@needs_lightning
def test_lightning_trainctl_cancel_stops_the_trainer(server):
    from trainctl.integrations.lightning import TrainctlCallback
    cb = TrainctlCallback("lit-cancel", server=server.address)
    model, data = _tiny_lightning(delay=0.02, sched="step")
    client = server.client()
    t = _steer_when(cb, 5, lambda i: client.cancel(i))
    trainer = _trainer(cb, max_epochs=50)  # 800 steps unless the cancel stops it
    trainer.fit(model, data)
    t.join(30)
    assert not t.errors, t.errors
    x = _by_name(client, "lit-cancel")
    assert x.state == "CANCELLED", x
    assert trainer.global_step < 100
    _rows_a_prefix(client, x.id, trainer.global_step)


def _rows_a_prefix(client: Client, id: int, n: int) -> None:
    """Rows of a cancelled run: each step at most once, in order. (Not all n: the server
    stores none that arrive after the cancel made the run final, an SDK/server matter.)"""
    steps = client.metrics(id).get("STEP/loss", {}).get("step", [])
    assert steps == list(range(len(steps))) and len(steps) <= n, (steps, n)


def _tiny_hf(tmp: Path, cb, accumulate: int = 1, epochs: int = 2, delay: float = 0.0):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, 32, (8,), generator=g)
            return {"input_ids": ids, "labels": int(ids[0] < 16)}

    class Slow(TrainerCallback):
        def on_step_end(self, *a, **k):
            time.sleep(delay)

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=8, num_labels=2))
    args = TrainingArguments(output_dir=str(tmp / "hf"), num_train_epochs=epochs, per_device_train_batch_size=4,
                             gradient_accumulation_steps=accumulate, learning_rate=1e-3, lr_scheduler_type="cosine",
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb] + ([Slow()] if delay else []))


@needs_transformers
def test_hf_accumulation_one_step_per_optimizer_step_steered(server, tmp_path):
    from transformers import get_cosine_schedule_with_warmup
    from trainctl.integrations.transformers import TrainctlCallback
    cb = TrainctlCallback("hf-acc", server=server.address)
    trainer = _tiny_hf(tmp_path, cb, accumulate=2, delay=0.02)
    client = server.client()
    t = _steer_when(cb, 4, lambda i: client.scale_lr(i, 0.5))
    trainer.train()
    t.join(30)
    assert not t.errors, t.errors
    x = _by_name(client, "hf-acc")
    assert x.state == "COMPLETED", x
    steps = 2 * 64 // (4 * 2)  # 16 optimizer steps
    assert trainer.state.global_step == steps
    # accelerate's wrappers unwrapped: the SDK holds the torch objects themselves.
    st = cb.run.steering
    assert type(st.optimizer).__module__.startswith("torch.") and type(st.scheduler).__name__ == "LambdaLR"
    m = client.metrics(x.id)
    assert m["STEP/loss"]["step"] == m["STEP/lr"]["step"] == list(range(steps))
    assert "STEP/train_runtime" not in m  # the end-of-training summary is not a step metric
    (cmd,) = client.controls(x.id)
    s = cmd.applied_step
    own = _lrs(lambda o: get_cosine_schedule_with_warmup(o, 0, steps), 1e-3, steps)
    want = [own[k] if k < s else own[k] * 0.5 for k in range(steps)]
    assert m["STEP/lr"]["value"] == pytest.approx(want, rel=1e-9)


@needs_transformers
def test_hf_trainctl_cancel_stops_the_trainer(server, tmp_path):
    from trainctl.integrations.transformers import TrainctlCallback
    cb = TrainctlCallback("hf-cancel", server=server.address)
    trainer = _tiny_hf(tmp_path, cb, epochs=50, delay=0.02)  # 800 steps unless the cancel stops it
    client = server.client()
    t = _steer_when(cb, 5, lambda i: client.cancel(i))
    trainer.train()
    t.join(30)
    assert not t.errors, t.errors
    x = _by_name(client, "hf-cancel")
    assert x.state == "CANCELLED", x
    n = trainer.state.global_step
    assert n < 100
    _rows_a_prefix(client, x.id, n)
