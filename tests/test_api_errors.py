"""Bad input gets the right gRPC status and a message naming the field; nothing stored."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from tests.conftest import digits_spec
from trainctl.client import TrainctlError
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc


def _code(fn, *args, **kwargs) -> TrainctlError:
    with pytest.raises(TrainctlError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s["model"].update(name="resnet_does_not_exist"), "model.name"),
    (lambda s: s.update(colour="blue"), "colour: unknown key"),
    (lambda s: s["optimizer"].update(lr=-0.1), "optimizer.lr: must be > 0, got -0.1"),
    (lambda s: s["train"].update(epochs=0), "train.epochs: must be >= 1, got 0"),
    (lambda s: s["schedule"].update(warmup_epochs=-1), "schedule.warmup_epochs: must be >= 0, got -1"),
    (lambda s: s["schedule"].update(name="sawtooth"), "schedule.name: unknown schedule 'sawtooth'"),
    (lambda s: s["data"].update(batch_size=0), "data.batch_size"),
    (lambda s: s["train"].update(epochs=2.5), "train.epochs"),
    (lambda s: s.pop("model"), "model: required"),
    (lambda s: s.update(control=[{"at_step": 5, "set_lr": float("nan")}]), "control.0"),
    (lambda s: s.update(control=[{"at_step": 5, "set_lr": 0.1, "scale_lr": 2}]), "exactly one of"),
])
def test_invalid_spec_is_invalid_argument_naming_the_field(server_only, mutate, field):
    spec = digits_spec("bad")
    mutate(spec)
    with server_only.client() as c:
        before = len(c.list())
        err = _code(c.submit, spec)
        assert err.code == "INVALID_ARGUMENT"
        assert field in err.message, err.message
        assert len(c.list()) == before  # nothing stored


def test_unknown_ids_are_not_found(server_only):
    with server_only.client() as c:
        for call in (lambda: c.get(999_999), lambda: c.set_lr(999_999, 0.1), lambda: c.cancel(999_999),
                     lambda: c.metrics(999_999), lambda: c.controls(999_999), lambda: c.replay(999_999),
                     lambda: list(c.watch(999_999))):
            err = _code(call)
            assert err.code == "NOT_FOUND" and "999999" in err.message, err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1, 0.0])
def test_bad_control_values_are_invalid_argument(server_only, value):
    with server_only.client() as c:
        x = c.submit(digits_spec("ctl"))
        err = _code(c.set_lr, x.id, value)
        assert err.code == "INVALID_ARGUMENT" and "set_lr" in err.message
        assert c.controls(x.id) == []  # refused commands are not persisted


def test_decay_outside_range_is_invalid_argument(server_only):
    with server_only.client() as c:
        x = c.submit(digits_spec("decay-range", schedule={"name": "step", "step_size": 1}))
        assert _code(c.set_decay, x.id, 1.5).code == "INVALID_ARGUMENT"


def test_decay_on_schedule_without_one_is_failed_precondition(server_only):
    with server_only.client() as c:
        x = c.submit(digits_spec("const", schedule={"name": "constant"}))
        err = _code(c.set_decay, x.id, 0.5)
        assert err.code == "FAILED_PRECONDITION"
        assert "step" in err.message and "multistep" in err.message, err.message  # names the ones that have one
        err = _code(c.set_decay, x.id, 0.99, target="ema")
        assert err.code == "FAILED_PRECONDITION" and "ema" in err.message


def test_control_of_finished_run_is_failed_precondition(server_only):
    with server_only.client() as c:
        x = c.submit(digits_spec("fin"))
        assert c.cancel(x.id).state == "CANCELLED"
        err = _code(c.set_lr, x.id, 0.01)
        assert err.code == "FAILED_PRECONDITION" and "CANCELLED" in err.message
        assert _code(c.cancel, x.id).code == "FAILED_PRECONDITION"


def test_control_on_queued_run_is_kept_pending(server_only):
    with server_only.client() as c:
        x = c.submit(digits_spec("queued"))
        r = c.set_lr(x.id, 0.05, wait=0.2)
        assert r.status == "PENDING" and r.source == "LIVE"
        # a retry with the same command id is idempotent
        again = c.control(x.id, "SET_LR", 0.05, command_id=r.command_id, wait=0.2)
        assert again.command_id == r.command_id
        assert len(c.controls(x.id)) == 1
        c.cancel(x.id)


def test_raw_grpc_bad_requests(server_only):
    with grpc.insecure_channel(server_only.address) as ch:
        stub = pb_grpc.ExperimentsStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Submit(pb.SubmitRequest(spec=struct_pb2.Struct()))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.Control(pb.ControlRequest(experiment_id=1, kind=pb.CONTROL_KIND_UNSPECIFIED, value=1))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.GetMetrics(pb.GetMetricsRequest(id=1, max_points=-5))
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        with pytest.raises(grpc.RpcError) as info:
            stub.List(pb.ListRequest(limit=-1))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_worker_stream_must_start_with_hello(server_only):
    with grpc.insecure_channel(server_only.address) as ch:
        stub = pb_grpc.WorkersStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Connect(iter([pb.WorkerMessage(heartbeat=pb.Heartbeat())])))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_scale_lr_nan_is_invalid_argument(server_only):
    with server_only.client() as c:
        x = c.submit(digits_spec("nan"))
        assert _code(c.scale_lr, x.id, float("nan")).code == "INVALID_ARGUMENT"
        c.cancel(x.id)


def test_second_connect_with_a_live_worker_id_is_refused(server_only):
    import threading

    hello = pb.WorkerMessage(hello=pb.Hello(worker_id="dup-worker", hostname="h"))
    stop = threading.Event()

    def first_requests():
        yield hello
        while not stop.wait(0.2):
            yield pb.WorkerMessage(heartbeat=pb.Heartbeat())

    with grpc.insecure_channel(server_only.address) as ch:
        stub = pb_grpc.WorkersStub(ch)
        first = stub.Connect(first_requests())
        assert next(first).WhichOneof("msg") == "welcome"
        try:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Connect(iter([hello]), timeout=10))
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "dup-worker" in info.value.details()
        finally:
            stop.set()
            first.cancel()


def test_server_refuses_a_database_from_a_newer_version(tmp_path):
    import sqlite3
    import subprocess
    import sys

    from trainctl.server.store import open_store

    db = tmp_path / "newer.db"
    open_store(f"sqlite:///{db}").close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num='9999_from_the_future'")
    out = subprocess.run([sys.executable, "-m", "trainctl.client.cli", "server", "--listen", "127.0.0.1:0",
                          "--db", f"sqlite:///{db}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "9999_from_the_future" in out.stderr and "newer" in out.stderr and "Traceback" not in out.stderr


def test_oversized_message_is_refused_cleanly(server_only):
    huge = struct_pb2.Struct()
    huge.update({"name": "x" * (65 * 1024 * 1024)})
    with grpc.insecure_channel(server_only.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ExperimentsStub(ch).Submit(pb.SubmitRequest(spec=huge), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with server_only.client() as c:  # and the server is fine
        assert isinstance(c.list(), list)
