"""Bad input gets the right gRPC status and a message naming the field; nothing stored."""
from __future__ import annotations

import time

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
        assert c.cancel(x.id).state == "CANCELLED"  # cancelling twice is idempotent (issue 11 item 11)


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


# ---------------------------------------------------------------- issue 10 items 10-12, issue 11 items 6, 12, 13

def _raw(server, method: str, request, **kw):
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        return getattr(pb_grpc.ExperimentsStub(ch), method)(request, timeout=60, **kw)


def _raw_error(server, method: str, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _raw(server, method, request)
    return info.value


def test_oversized_spec_is_refused_naming_the_field_and_the_limit(server_only):
    spec = digits_spec("big")
    spec["model"]["kwargs"] = {"blob": "x" * (3 << 20)}
    err = _raw_error(server_only, "Submit", pb.SubmitRequest(spec=_struct(spec)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.kwargs.blob" in err.details() and "1,048,576 (1 MiB)" in err.details(), err.details()
    spec["model"]["kwargs"] = {}
    spec["data"]["path"] = "/d" * 3000
    err = _raw_error(server_only, "Submit", pb.SubmitRequest(spec=_struct(spec)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "data.path: a string of 6,000 characters; the limit is 4,096" in err.details(), err.details()


def _struct(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


@pytest.mark.parametrize("mutate, line", [
    (lambda s: s["schedule"].update(warmup_epochs=float("inf")), "schedule.warmup_epochs: must be a finite number"),
    (lambda s: s["schedule"].update(warmup_lr=float("inf")), "schedule.warmup_lr: must be a finite number"),
    (lambda s: s["schedule"].update(min_lr=float("inf")), "schedule.min_lr: must be a finite number"),
    (lambda s: s["train"].update(clip_grad=float("inf")), "train.clip_grad: must be a finite number"),
    (lambda s: s["train"].update(mixup={"mixup_alpha": float("inf")}), "train.mixup.mixup_alpha: must be a finite"),
    (lambda s: s.update(epochs=3), "epochs: unknown key; did you mean train.epochs?"),
    (lambda s: s["train"].update(seeed=3), "did you mean train.seed?"),
])
def test_spec_faults_over_grpc(server_only, mutate, line):
    spec = digits_spec("ranges")
    mutate(spec)
    err = _raw_error(server_only, "Submit", pb.SubmitRequest(spec=_struct(spec)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and line in err.details(), err.details()


def test_every_fault_at_once_over_grpc(server_only):
    spec = digits_spec("all-at-once")
    spec["model"]["name"] = "resnet_does_not_exist"
    spec["optimizer"]["lr"] = -1
    spec["colour"] = "blue"
    details = _raw_error(server_only, "Submit", pb.SubmitRequest(spec=_struct(spec))).details()
    for part in ("model.name: unknown timm model", "optimizer.lr: must be > 0", "colour: unknown key"):
        assert part in details, details


def test_scale_lr_of_absurd_magnitude_is_refused_with_the_range(server_only):
    with server_only.client() as c:
        x = c.submit(digits_spec("absurd"))
        err = _code(c.scale_lr, x.id, 1e308)
        assert err.code == "INVALID_ARGUMENT" and "(0, 1000]" in err.message, err.message
        assert c.controls(x.id) == []
        c.cancel(x.id)


def test_list_pages_with_tokens_newest_first_no_dup_no_gap(server_only):
    with server_only.client() as c:
        made = [c.submit(digits_spec(f"page-{i}")).id for i in range(23)]
    got, token, pages = [], "", 0
    while True:
        resp = _raw(server_only, "List", pb.ListRequest(limit=5, page_token=token))
        assert len(resp.experiments) <= 5
        got += [x.id for x in resp.experiments]
        token, pages = resp.next_page_token, pages + 1
        if not token:
            break
    assert got == sorted(got, reverse=True) and len(got) == len(set(got))
    assert set(made) <= set(got) and pages == -(-len(got) // 5)
    # a state filter pages the same way
    first = _raw(server_only, "List", pb.ListRequest(limit=2, states=[pb.QUEUED]))
    second = _raw(server_only, "List", pb.ListRequest(limit=2, states=[pb.QUEUED], page_token=first.next_page_token))
    assert all(x.state == pb.QUEUED for x in [*first.experiments, *second.experiments])
    assert first.experiments[-1].id > second.experiments[0].id


@pytest.mark.parametrize("token", ["garbage!", "djE6YWJj", "eDox"])
def test_bad_page_token_is_invalid_argument(server_only, token):
    err = _raw_error(server_only, "List", pb.ListRequest(page_token=token))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.details()


def test_bad_enum_values_are_invalid_argument_naming_the_field(server_only):
    err = _raw_error(server_only, "List", pb.ListRequest(states=[pb.QUEUED, 42]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("states[1]: unknown value 42; expected one of QUEUED"), err.details()
    err = _raw_error(server_only, "GetMetrics", pb.GetMetricsRequest(id=1, scope=9))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("scope: unknown value 9")


@pytest.fixture(scope="module")
def info_server(tmp_path_factory):
    """A server logging at INFO, for tests that read its log."""
    import os

    from tests.conftest import Cluster

    old = os.environ.get("TRAINCTL_LOG")
    os.environ["TRAINCTL_LOG"] = "INFO"
    try:
        c = Cluster(tmp_path_factory.mktemp("info-server"))
        c.wait_serving()  # its startup lines are logged before the tests read the log
    finally:
        if old is None:
            del os.environ["TRAINCTL_LOG"]
        else:
            os.environ["TRAINCTL_LOG"] = old
    yield c
    c.stop()


def test_garbage_request_bytes_are_invalid_argument_with_rate_limited_log(info_server):
    server_only = info_server
    import random

    rnd = random.Random(7)
    methods = ["Submit", "Get", "List", "GetMetrics", "Control", "Watch", "Replay"]
    log_before = server_only.server.output()
    with grpc.insecure_channel(server_only.address) as ch:
        for i in range(60):
            method = methods[i % len(methods)]
            path = f"/trainctl.v1.Experiments/{method}"
            call = ch.unary_stream(path) if method == "Watch" else ch.unary_unary(path)
            body = b"\xff\xff\xff\xff\x0f" + rnd.randbytes(rnd.randint(0, 64))  # never a valid message
            with pytest.raises(grpc.RpcError) as info:
                out = call(body, timeout=10)
                if method == "Watch":
                    list(out)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value)
            assert "not a valid trainctl.v1." in info.value.details()
    time.sleep(0.5)
    new = server_only.server.output()[len(log_before):]
    assert "Traceback" not in new and "UNKNOWN" not in new, new
    lines = [l for l in new.splitlines() if "bad request to" in l]
    assert 1 <= len(lines) <= len(methods), new  # one line per method per minute, not one per call


def test_spec_json_keeps_declared_types(server_only):
    import json

    with server_only.client() as c:
        x = c.submit(digits_spec("typed", epochs=3))
    got = _raw(server_only, "Get", pb.GetRequest(id=x.id))
    spec = json.loads(got.spec_json)
    assert spec["train"]["epochs"] == 3 and type(spec["train"]["epochs"]) is int
    assert type(spec["data"]["batch_size"]) is int and type(spec["optimizer"]["lr"]) is float
    assert type(spec["schedule"]["warmup_epochs"]) is float  # declared float: 1 -> 1.0
    listed = _raw(server_only, "List", pb.ListRequest(limit=1)).experiments[0]
    assert json.loads(listed.spec_json)["train"]["epochs"] == 3


def test_replay_is_named_after_its_source_and_linked(info_server):
    server_only = info_server
    with server_only.client() as c:
        x = c.submit(digits_spec("source-run"))
        y = c.replay(x.id)
        assert (y.name, y.replay_of) == (f"source-run-replay-of-{x.id}", x.id)
        z = c.replay(y.id)
        assert z.name == f"source-run-replay-of-{x.id}-replay-of-{y.id}" and len(z.name) <= 128
        for e in (x, y, z):
            c.cancel(e.id)
    time.sleep(0.3)
    log = server_only.server.output()
    assert f"experiment {y.id} 'source-run-replay-of-{x.id}' submitted and queued, replaying experiment {x.id}" \
        in log, log[-2000:]
    assert f"experiment {x.id} 'source-run' submitted and queued" in log


def test_rows_stored_before_the_cap_cannot_break_listing(tmp_path):
    """Two 30 MB specs (stored directly, as an old server accepted them): List still
    answers, pages by size, and lists both (their specs left out)."""
    from tests.conftest import Cluster
    from trainctl.server.store import open_store

    cluster = Cluster(tmp_path)
    try:
        cluster.wait_serving()  # the server created the schema
        with open_store(f"sqlite:///{cluster.db_path}") as store:
            small = store.create_experiment("small", digits_spec("small"))
            big = [store.create_experiment(f"huge-{i}", {**digits_spec(f"huge-{i}"), "pad": "x" * (30 << 20)})
                   for i in range(2)]
        ids, token = [], ""
        while True:
            resp = _raw(cluster, "List", pb.ListRequest(page_token=token))
            assert resp.ByteSize() < 32 << 20
            ids += [x.id for x in resp.experiments]
            token = resp.next_page_token
            if not token:
                break
        assert ids == [big[1].id, big[0].id, small.id]
        got = _raw(cluster, "Get", pb.GetRequest(id=big[0].id))
        assert got.name == "huge-0" and not got.spec_json  # too big to send: left out, not an error
        assert _raw(cluster, "Get", pb.GetRequest(id=small.id)).spec_json
    finally:
        cluster.stop()


def test_get_metrics_names_are_bounded(server_only):
    err = _raw_error(server_only, "GetMetrics", pb.GetMetricsRequest(id=1, names=[f"n{i}" for i in range(5000)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("names: at most 1000")
    err = _raw_error(server_only, "GetMetrics", pb.GetMetricsRequest(id=1, names=["x" * 500]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "longest 500" in err.details()
