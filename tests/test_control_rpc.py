"""The Control RPC in-process: the real server on a temp SQLite file and a scripted
worker over real gRPC loopback (tests/scripted.py). Covers the wait (APPLIED, REJECTED,
PENDING after wait_seconds, EXPIRED when the run ends), id reuse (idempotent retry vs
ALREADY_EXISTS), dry runs (nothing stored or sent, the consequence the worker would
give), hold, source, and set_lr_decay refused where no decay can act (issue 11 items
1, 2; issue 10 item 7)."""
from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from trainctl.spec import parse_spec
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.wire import struct_from_dict
from trainctl.workers.engine.context import Command
from trainctl.workers.engine.control import ControlTargets, apply_command
from trainctl.schedules import build_schedule

from .scripted import in_loop, running_server

SPE, EPOCHS = 22, 6  # digits, batch 64, val_fraction 0.2: 1437 train samples -> 22 steps


def spec(schedule=None, **train):
    return {"name": "steer", "model": {"name": "resnet10t"}, "data": {"dataset": "digits", "batch_size": 64},
            "optimizer": {"name": "sgd", "lr": 0.1},
            "schedule": schedule or {"name": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-3, "min_lr": 1e-4},
            "train": {"epochs": EPOCHS, **train}}


async def started(srv, spec_dict, steps=0):
    """Submit, let the scripted worker take it, report RUNNING and `steps` step rows."""
    x = await srv.experiments.Submit(pb.SubmitRequest(spec=struct_from_dict(spec_dict)))
    w = await srv.worker(f"w{x.id}")
    a = await w.expect("assignment")
    w.state(a.experiment_id, a.attempt, pb.RUNNING)
    if steps:
        w.metrics(a.experiment_id, a.attempt, 1, range(steps), names=("lr", "loss"))
        await srv.until(lambda: _delivered(srv, x.id, steps), what="rows stored")
    return x, w, a


async def _delivered(srv, id, steps):
    return (await srv.db(srv.store.delivered, id))[0] >= steps


def control(srv, id, kind, value, **kw):
    return srv.experiments.Control(pb.ControlRequest(experiment_id=id, kind=kind, value=value, **kw))


async def code_of(coro) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return e.value.code(), e.value.details()


@in_loop
async def test_control_wait_answers_the_workers_ack_with_its_consequence(tmp_path):
    async with running_server(tmp_path, lease_timeout=30) as srv:
        x, w, a = await started(srv, spec(), steps=2)
        call = asyncio.ensure_future(control(srv, x.id, pb.SET_LR, 0.02, command_id="c1", wait_seconds=10,
                                             source=pb.CONSOLE))
        cmd = await w.expect("control")
        assert (cmd.command_id, cmd.kind, cmd.value, cmd.hold) == ("c1", pb.SET_LR, 0.02, False)
        w.send(ack=pb.ControlAck(experiment_id=a.experiment_id, attempt=a.attempt, command_id="c1", ok=True,
                                 applied_step=2, old_value=0.01, new_value=0.02, consequence="warmup continues: x"))
        rec = await call
        assert rec.status == pb.APPLIED and rec.applied_step == 2 and rec.source == pb.CONSOLE
        assert rec.consequence == "warmup continues: x" and not rec.HasField("at_step")
        stored = (await srv.experiments.ListControls(pb.ListControlsRequest(experiment_id=x.id))).records
        assert [(r.command_id, r.status, r.consequence) for r in stored] == [("c1", pb.APPLIED, "warmup continues: x")]


@in_loop
async def test_control_wait_rejected_pending_and_expired(tmp_path):
    async with running_server(tmp_path, lease_timeout=30) as srv:
        x, w, a = await started(srv, spec(), steps=1)
        call = asyncio.ensure_future(control(srv, x.id, pb.SCALE_LR, 0.5, command_id="r", wait_seconds=10))
        await w.expect("control")
        w.send(ack=pb.ControlAck(experiment_id=x.id, attempt=a.attempt, command_id="r", ok=False, applied_step=3,
                                 message="refused for a reason"))
        rec = await call
        assert rec.status == pb.REJECTED and rec.message == "refused for a reason"

        rec = await control(srv, x.id, pb.SCALE_LR, 0.5, command_id="p", wait_seconds=0.3)
        assert rec.status == pb.PENDING  # the worker never answered within wait_seconds

        call = asyncio.ensure_future(control(srv, x.id, pb.SCALE_LR, 0.7, command_id="e", wait_seconds=10))
        await w.expect("control", index=2)
        w.state(x.id, a.attempt, pb.COMPLETED)  # the run ends before it applied "e"
        rec = await call
        assert rec.status == pb.EXPIRED and rec.message
        final = {r.command_id: r.status for r in
                 (await srv.experiments.ListControls(pb.ListControlsRequest(experiment_id=x.id))).records}
        assert final == {"r": pb.REJECTED, "p": pb.EXPIRED, "e": pb.EXPIRED}


@in_loop
async def test_command_id_reuse_is_an_idempotent_retry_or_already_exists(tmp_path):
    async with running_server(tmp_path, lease_timeout=30) as srv:
        x, w, a = await started(srv, spec())
        first = await control(srv, x.id, pb.SET_LR, 0.05, command_id="same", wait_seconds=0.2)
        again = await control(srv, x.id, pb.SET_LR, 0.05, command_id="same", wait_seconds=0.2)
        assert first.command_id == again.command_id == "same" and again.status == pb.PENDING
        await asyncio.sleep(0.2)
        assert len(w.of_kind("control")) == 1  # a retry is not sent again (it would apply twice)
        w.send(ack=pb.ControlAck(experiment_id=x.id, attempt=a.attempt, command_id="same", ok=True,
                                 applied_step=0, old_value=0.001, new_value=0.05))
        await srv.until(lambda: srv.db(srv.store.list_controls, x.id, status="APPLIED"), what="applied")
        done = await control(srv, x.id, pb.SET_LR, 0.05, command_id="same", wait_seconds=0.2)
        assert done.status == pb.APPLIED and done.applied_step == 0
        code, msg = await code_of(control(srv, x.id, pb.SET_LR, 0.06, command_id="same"))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "same" in msg and "command_id" in msg
        code, _ = await code_of(control(srv, x.id, pb.SET_LR, 0.05, command_id="same", hold=True))
        assert code == grpc.StatusCode.ALREADY_EXISTS  # hold is part of the command
        # the same id in another experiment is another command
        y = await srv.experiments.Submit(pb.SubmitRequest(spec=struct_from_dict(spec())))
        other = await control(srv, y.id, pb.SET_LR, 0.07, command_id="same", wait_seconds=0.2)
        assert other.experiment_id == y.id and other.value == 0.07


@in_loop
async def test_bad_requests_are_invalid_argument_naming_the_field(tmp_path):
    async with running_server(tmp_path, lease_timeout=30) as srv:
        x, w, a = await started(srv, spec())
        cases = [
            (dict(kind=pb.SET_EMA_DECAY, value=0.9, hold=True), "hold"),
            (dict(kind=pb.SET_LR, value=0.1, source=pb.SCHEDULED), "source"),
            (dict(kind=pb.SET_LR, value=math.inf), "value"),
            (dict(kind=pb.SET_LR, value=0.1, wait_seconds=-1), "wait_seconds"),
            (dict(kind=0, value=0.1), "kind"),
        ]
        for fields, field in cases:
            code, msg = await code_of(srv.experiments.Control(pb.ControlRequest(experiment_id=x.id, **fields)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith(f"{field}:"), (fields, msg)
        assert not w.of_kind("control")


@in_loop
async def test_dry_run_stores_and_sends_nothing_and_says_what_the_worker_would(tmp_path):
    async with running_server(tmp_path, lease_timeout=30) as srv:
        x, w, a = await started(srv, spec(), steps=2)
        rec = await control(srv, x.id, pb.SET_LR, 0.02, dry_run=True)
        assert rec.status == pb.CONTROL_STATUS_UNSPECIFIED and rec.applied_step == 2
        assert rec.message.startswith("dry run: nothing stored or sent")
        assert rec.new_value == 0.02 and rec.old_value == pytest.approx(0.001 + 2 * (0.1 - 0.001) / SPE)
        # the worker's own words for the same command at the same step
        sched = build_schedule(parse_spec(spec()).schedule, base_lr=0.1, steps_per_epoch=SPE, epochs=EPOCHS)
        ack = apply_command(Command("c", "set_lr", 0.02), 2, ControlTargets(sched, optimizer=None))
        assert rec.consequence == ack.consequence and rec.consequence.startswith("warmup continues: peak 0.")
        held = await control(srv, x.id, pb.SET_LR, 0.02, dry_run=True, hold=True)
        assert held.consequence.startswith("LR held at 0.02 from step 2") and held.hold
        await asyncio.sleep(0.3)
        assert not w.of_kind("control")
        assert not (await srv.experiments.ListControls(pb.ListControlsRequest(experiment_id=x.id))).records


@in_loop
async def test_dry_run_of_a_queued_run_and_steps_per_epoch_from_what_the_run_reported(tmp_path):
    async with running_server(tmp_path, lease_timeout=30) as srv:
        # A run whose first epoch row says 10 steps per epoch: the forecast uses that.
        x, w, a = await started(srv, spec(schedule={"name": "step", "step_size": 2, "gamma": 0.5}), steps=12)
        w.metrics(x.id, a.attempt, 2, [10], scope=pb.EPOCH, names=("val_loss", "lr"), value=1.0, epoch=0)
        await srv.until(lambda: srv.db(srv.store.get_metrics, x.id, scope="EPOCH"), what="epoch row")
        rec = await control(srv, x.id, pb.SET_LR_DECAY, 0.1, dry_run=True)
        assert "next decay at step 20" in rec.consequence and "final" in rec.consequence
        # no worker is free: y stays QUEUED and a command would apply at its step 0
        y = await srv.experiments.Submit(pb.SubmitRequest(spec=struct_from_dict(spec())))
        rec = await control(srv, y.id, pb.SCALE_LR, 2.0, dry_run=True)
        assert rec.applied_step == 0 and "at step 0" in rec.message and rec.consequence.startswith("warmup continues")


@in_loop
async def test_set_lr_decay_where_no_decay_can_act_is_failed_precondition(tmp_path):
    async with running_server(tmp_path, lease_timeout=30) as srv:
        x, w, a = await started(srv, spec())  # cosine, cycle_limit 1
        code, msg = await code_of(control(srv, x.id, pb.SET_LR_DECAY, 0.5))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "cycle_limit 1" in msg
        # step schedule: decays at epochs 2 and 4 (steps 44, 88); after step 88 none is left
        y, wy, ay = await started(srv, spec(schedule={"name": "step", "step_size": 2, "gamma": 0.5}), steps=90)
        code, msg = await code_of(control(srv, y.id, pb.SET_LR_DECAY, 0.5))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "step 90" in msg, msg
        stored = (await srv.experiments.ListControls(pb.ListControlsRequest(experiment_id=y.id))).records
        assert not stored and not wy.of_kind("control")
        # and where a decay is left, it goes through to the worker
        z, wz, az = await started(srv, spec(schedule={"name": "step", "step_size": 2, "gamma": 0.5}), steps=30)
        rec = await control(srv, z.id, pb.SET_LR_DECAY, 0.5, wait_seconds=0.2)
        assert rec.status == pb.PENDING and (await wz.expect("control")).kind == pb.SET_LR_DECAY
