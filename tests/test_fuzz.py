"""Property-based fuzzing of a live server: 1,000+ random specs and control calls.

Every answer is OK or a clean error with a known status, the server stays up, and what
it stored is consistent (every stored spec is valid, every control belongs to a stored
experiment)."""
from __future__ import annotations

import sqlite3

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Cluster, digits_spec
from trainctl.client import TrainctlError
from trainctl.spec import parse_spec

CLEAN = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=12)
SECTIONS = ["name", "model", "data", "optimizer", "schedule", "loss", "train", "control", "resources", "max_restarts"]


@st.composite
def specs(draw):
    """Mostly-valid specs with a few fields replaced by junk, plus fully random ones."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
    spec = digits_spec(draw(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)))
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from(SECTIONS))
        if isinstance(spec.get(section), dict) and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(spec[section]) + ["bogus", "lr", "name", "gamma", "epochs"]))
            spec[section] = {**spec[section], key: draw(json_values)}
        else:
            spec[section] = draw(json_values)
    return spec


@pytest.fixture(scope="module")
def fuzz_cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("fuzz"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def fuzz_client(fuzz_cluster):
    with fuzz_cluster.client() as c:
        yield c


def _clean(call):
    try:
        call()
    except TrainctlError as exc:
        assert exc.code in CLEAN, f"unexpected {exc.code}: {exc.message}"
        assert exc.message


@settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(spec=specs())
def test_random_specs_get_ok_or_clean_errors(fuzz_client, spec):
    _clean(lambda: fuzz_client.submit(spec))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(exp=st.integers(-5, 40), kind=st.sampled_from(["SET_LR", "SCALE_LR", "SET_LR_DECAY", "SET_EMA_DECAY",
                                                      "SET_WEIGHT_DECAY", "CONTROL_KIND_UNSPECIFIED"]),
       value=st.floats(allow_nan=True, allow_infinity=True), cancel=st.booleans())
def test_random_control_calls_get_ok_or_clean_errors(fuzz_client, exp, kind, value, cancel):
    _clean(lambda: fuzz_client.control(exp, kind, value, wait=0.05))
    if cancel:
        _clean(lambda: fuzz_client.cancel(exp))


RAW_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS}


@pytest.fixture(scope="module")
def raw_channel(fuzz_cluster):
    with grpc.insecure_channel(fuzz_cluster.address) as ch:
        yield ch


def _raw_status(call, body) -> grpc.StatusCode:
    try:
        call(body, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in RAW_OK, f"{exc.code()}: {exc.details()}"
        assert exc.details()
        return exc.code()
    return grpc.StatusCode.OK


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(method=st.sampled_from(["Submit", "Get", "List", "GetMetrics", "Control", "ListControls", "Cancel"]),
       body=st.binary(max_size=120))
def test_random_request_bytes_get_ok_or_clean_errors(raw_channel, method, body):
    """Whatever the bytes (undecodable, or decoding into any field values), a clean status."""
    _raw_status(raw_channel.unary_unary(f"/trainctl.v1.Experiments/{method}"), body)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(states=st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), max_size=3), limit=st.integers(-5, 20_000),
       token=st.text(max_size=24), scope=st.integers(-2 ** 31, 2 ** 31 - 1), max_points=st.integers(-3, 5000),
       names=st.lists(st.text(max_size=200), max_size=3))
def test_random_enum_values_and_paging_fields_get_clean_errors(raw_channel, states, limit, token, scope,
                                                              max_points, names):
    from trainctl.v1 import trainctl_pb2 as pb

    lst = raw_channel.unary_unary("/trainctl.v1.Experiments/List")
    _raw_status(lst, pb.ListRequest(states=states, limit=limit, page_token=token).SerializeToString())
    gm = raw_channel.unary_unary("/trainctl.v1.Experiments/GetMetrics")
    _raw_status(gm, pb.GetMetricsRequest(id=1, scope=scope, max_points=max_points, names=names).SerializeToString())


def test_server_survived_and_store_is_consistent(fuzz_cluster, fuzz_client):
    with grpc.insecure_channel(fuzz_cluster.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    xs = fuzz_client.list(limit=10_000)
    assert xs, "the fuzzer never produced a valid spec"
    for x in xs:
        parse_spec(x.spec, check_model=False)  # everything stored is a valid spec
    with sqlite3.connect(fuzz_cluster.db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        orphans = db.execute("SELECT COUNT(*) FROM controls WHERE experiment_id NOT IN "
                             "(SELECT id FROM experiments)").fetchone()[0]
        assert orphans == 0
        bad_states = db.execute("SELECT COUNT(*) FROM experiments WHERE state NOT IN "
                                "('QUEUED','CANCELLED')").fetchone()[0]
        assert bad_states == 0  # no worker: nothing may have left QUEUED except by Cancel
