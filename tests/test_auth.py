"""Bearer tokens by role, and TLS: every refusal has its status; tokens never logged."""
from __future__ import annotations

import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import Cluster, Proc, digits_spec, free_port
from trainctl.client import Client, TrainctlError
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

CLIENT_TOKEN = "client-secret-7f3a9"
WORKER_TOKEN = "worker-secret-c41d2"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("auth"), ["--client-token", CLIENT_TOKEN, "--worker-token", WORKER_TOKEN])
    yield c
    c.stop()


def _code(call) -> str:
    with pytest.raises(TrainctlError) as info:
        call()
    return info.value.code


def test_client_calls_need_the_client_token(secured):
    assert _code(lambda: Client(secured.address, token="").list()) == "UNAUTHENTICATED"
    assert _code(lambda: Client(secured.address, token="nope").list()) == "UNAUTHENTICATED"
    assert _code(lambda: Client(secured.address, token=WORKER_TOKEN).list()) == "PERMISSION_DENIED"
    assert _code(lambda: list(Client(secured.address, token="nope").watch(1))) == "UNAUTHENTICATED"
    assert Client(secured.address, token=CLIENT_TOKEN).list() is not None


def test_worker_stream_needs_the_worker_token(secured):
    hello = pb.WorkerMessage(hello=pb.Hello(worker_id="intruder"))
    with grpc.insecure_channel(secured.address) as ch:
        stub = pb_grpc.WorkersStub(ch)
        for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("bad", grpc.StatusCode.UNAUTHENTICATED),
                            (CLIENT_TOKEN, grpc.StatusCode.PERMISSION_DENIED)):
            md = (("authorization", f"Bearer {token}"),) if token else None
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Connect(iter([hello]), metadata=md, timeout=10))
            assert info.value.code() == code


def test_health_stays_open(secured):
    with grpc.insecure_channel(secured.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
def test_worker_with_token_trains_and_bad_worker_exits(secured):
    bad = secured.add_worker("bad-worker", "--token", "wrong")
    assert bad.popen.wait(60) == 3
    assert "UNAUTHENTICATED" in bad.output()
    secured.add_worker("good-worker", "--token", WORKER_TOKEN)
    with Client(secured.address, token=CLIENT_TOKEN) as c:
        x = c.submit(digits_spec("authed", epochs=1, max_steps=3))
        assert c.wait(x.id, timeout=120).state == "COMPLETED", secured.logs()
    logs = secured.logs()
    assert CLIENT_TOKEN not in logs and WORKER_TOKEN not in logs and "wrong" not in logs.replace("wrong token", "")


def _make_certs(d) -> dict:
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=trainctl-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return {n: str(d / n) for n in ("ca.pem", "server.pem", "server.key")}


def test_tls_server_accepts_tls_clients_only(tmp_path, monkeypatch):
    certs = _make_certs(tmp_path)
    port = free_port()
    proc = Proc(["server", "--listen", f"127.0.0.1:{port}", "--db", f"sqlite:///{tmp_path / 't.db'}",
                 "--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"]], tmp_path / "server.log")
    try:
        monkeypatch.setenv("TRAINCTL_TLS_CA", certs["ca.pem"])
        deadline = time.monotonic() + 60
        while True:
            try:
                assert Client(f"127.0.0.1:{port}").list() == []
                break
            except TrainctlError as exc:
                if exc.code != "UNAVAILABLE" or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        monkeypatch.delenv("TRAINCTL_TLS_CA")
        assert _code(lambda: Client(f"127.0.0.1:{port}", timeout=3).list()) == "UNAVAILABLE"
    finally:
        proc.stop()
