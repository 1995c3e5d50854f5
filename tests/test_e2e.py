"""The whole loop over real gRPC with real processes: submit -> dispatch -> train ->
stream -> steer, then the same numbers back from the store."""
from __future__ import annotations

import math
import threading

import pytest

from tests.conftest import Cluster, digits_spec
from trainctl.spec import parse_spec
from trainctl.workers.engine.data import build_data
from trainctl.schedules import build_schedule

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One server and one worker for the module: the server start and the worker's torch
    import are paid once. Each test waits for every run it submits to end, so no test
    sees another's run, and each ends checking that the worker still trains."""
    c = Cluster(tmp_path_factory.mktemp("e2e"))
    c.add_worker("w0")
    yield c
    c.stop()


def _schedule_for(spec_dict: dict):
    spec = parse_spec(spec_dict, check_model=False)
    spe = len(build_data(spec.data, seed=spec.train.seed).train)
    return build_schedule(spec.schedule, base_lr=spec.optimizer.lr, steps_per_epoch=spe,
                          epochs=spec.train.epochs), spe


def test_submit_watch_steer_and_history(cluster):
    spec = digits_spec("e2e", epochs=4, control=[{"at_step": 10, "scale_lr": 0.5}])
    with cluster.client() as c:
        x = c.submit(spec)
        assert x.state == "QUEUED" and x.id > 0
        sched, spe = _schedule_for(x.spec)
        total = spe * 4
        steer_at = total // 2
        acks, steps, epochs, states = [], {}, [], []

        def steer():
            acks.append(c.set_lr(x.id, 0.02))

        steering = None
        for ev in c.watch(x.id):
            if ev.kind == "step":
                assert ev.step not in steps, f"step {ev.step} streamed twice"
                steps[ev.step] = ev.values
                if ev.step >= steer_at and steering is None:
                    steering = threading.Thread(target=steer)
                    steering.start()
            elif ev.kind == "epoch":
                epochs.append(ev)
            elif ev.kind == "experiment":
                states.append(ev.experiment.state)
        steering.join(30)

        final = c.get(x.id)
        assert final.state == "COMPLETED", cluster.logs()
        assert states[-1] == "COMPLETED" and "RUNNING" in states
        assert final.summary["val_top1"] > 0.8, final.summary  # chance is 0.1

        # every step once, in order, all of them
        assert sorted(steps) == list(range(total))
        assert len(epochs) == 4 and [e.epoch for e in epochs] == [0, 1, 2, 3]

        # the ack: applied inside the run, with the old and new LR
        (ack,) = acks
        assert ack.status == "APPLIED", ack
        s = ack.applied_step
        assert steer_at <= s < total
        assert ack.new_value == pytest.approx(0.02, rel=1e-12)

        # scheduled scale_lr at step 10 came through the same path
        log = {r.source: r for r in c.controls(x.id)}
        assert log["SCHEDULED"].status == "APPLIED" and log["SCHEDULED"].applied_step == 10
        assert log["LIVE"].applied_step == s

        # LR before step 10: the schedule; from 10: x0.5; from s: rescaled so lr(s) = 0.02
        for step in range(total):
            expected = sched.lr_at(step)
            if step >= 10:
                expected *= 0.5
            if step >= s:
                expected *= 0.02 / (sched.lr_at(s) * 0.5)
            assert math.isclose(steps[step]["lr"], expected, rel_tol=1e-12), (step, steps[step]["lr"], expected)
        assert math.isclose(steps[s]["lr"], 0.02, rel_tol=1e-12)
        assert math.isclose(ack.old_value, sched.lr_at(s) * 0.5, rel_tol=1e-12)

        # the store returns exactly what was streamed
        hist = c.metrics(x.id)
        assert hist["STEP/lr"]["step"] == list(range(total))
        assert hist["STEP/lr"]["value"] == [steps[i]["lr"] for i in range(total)]
        assert hist["STEP/loss"]["value"] == [steps[i]["loss"] for i in range(total)]
        assert hist["EPOCH/val_top1"]["value"] == [e.values["val_top1"] for e in epochs]

        # a watch started after the end replays the same history, from a given step too
        again = [ev for ev in c.watch(x.id, from_step=s) if ev.kind == "step"]
        assert [ev.step for ev in again] == list(range(s, total))
        assert [ev.values["lr"] for ev in again] == [steps[i]["lr"] for i in range(s, total)]


def test_cancel_running_experiment(cluster):
    with cluster.client() as c:
        x = c.submit(digits_spec("to-cancel", epochs=50))
        for ev in c.watch(x.id):
            if ev.kind == "step" and ev.step >= 3:
                c.cancel(x.id, "enough")
            if ev.kind == "experiment" and ev.experiment.is_final:
                break
        final = c.get(x.id)
        assert final.state == "CANCELLED" and final.message == "enough"
        # the worker is free again: the next experiment runs
        y = c.submit(digits_spec("after-cancel", epochs=1, max_steps=3))
        assert c.wait(y.id, timeout=120).state == "COMPLETED", cluster.logs()


def test_training_failure_is_reported_not_crashed(cluster, tmp_path):
    with cluster.client() as c:
        spec = digits_spec("bad-path", epochs=1)
        spec["data"] = {"dataset": "imagefolder", "path": str(tmp_path / "nowhere")}
        x = c.submit(spec)
        final = c.wait(x.id, timeout=120)
        assert final.state == "FAILED"
        assert str(tmp_path / "nowhere") in final.message and "Traceback" not in final.message
        # the worker survived and trains the next one
        y = c.submit(digits_spec("next", epochs=1, max_steps=2))
        assert c.wait(y.id, timeout=120).state == "COMPLETED", cluster.logs()


def test_replay_reproduces_the_run_bit_for_bit(cluster):
    with cluster.client() as c:
        x = c.submit(digits_spec("orig", epochs=2, max_steps=6, control=[{"at_step": 2, "scale_lr": 0.5}]))
        for ev in c.watch(x.id):
            if ev.kind == "step" and ev.step == 4:
                assert c.set_lr(x.id, 0.03).status == "APPLIED"
        assert c.get(x.id).state == "COMPLETED", cluster.logs()
        y = c.replay(x.id)
        assert y.replay_of == x.id
        assert c.wait(y.id, timeout=120).state == "COMPLETED", cluster.logs()

        orig, again = c.metrics(x.id), c.metrics(y.id)
        for key in ("STEP/loss", "STEP/lr", "STEP/acc", "EPOCH/val_loss", "EPOCH/val_top1"):
            assert again[key]["value"] == orig[key]["value"], key
        live = next(r for r in c.controls(x.id) if r.source == "LIVE")
        replayed = next(r for r in c.controls(y.id) if r.source == "REPLAYED")
        assert (replayed.kind, replayed.value, replayed.applied_step) == (live.kind, live.value, live.applied_step)
        assert c.get(y.id).summary["val_top1"] == c.get(x.id).summary["val_top1"]


def test_out_of_memory_fails_the_run_with_the_reason(cluster):
    with cluster.client() as c:
        # A ViT with a 2**20-wide embedding: one 13 TB weight, refused by the allocator at
        # once (a real out-of-memory, without pushing the machine into swap).
        spec = digits_spec("oom", epochs=1)
        spec["model"] = {"name": "test_vit", "kwargs": {"embed_dim": 2 ** 20, "num_heads": 1, "img_size": 32}}
        x = c.submit(spec)
        final = c.wait(x.id, timeout=120)
        assert final.state == "FAILED", cluster.logs()
        assert final.message.startswith("out of memory"), final.message
        y = c.submit(digits_spec("after-oom", epochs=1, max_steps=2))
        assert c.wait(y.id, timeout=120).state == "COMPLETED", cluster.logs()
