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
    secured.add_worker("good-worker", "--token", WORKER_TOKEN)  # at once: its torch import overlaps the refusal
    assert bad.popen.wait(60) == 3
    assert "UNAUTHENTICATED" in bad.output()
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
        with pytest.raises(TrainctlError) as info:
            Client(f"127.0.0.1:{port}", timeout=3).list()
        # the plaintext client is told why the server hung up (gRPC alone says "Socket closed")
        assert info.value.code == "UNAVAILABLE" and "may require TLS" in info.value.message, info.value.message
        assert "TRAINCTL_TLS_CA" in info.value.message
    finally:
        proc.stop()


def test_client_token_from_a_file_and_the_env(secured, tmp_path, capsys, monkeypatch):
    from trainctl.client.cli import main

    f = tmp_path / "client.token"
    f.write_text(CLIENT_TOKEN + "\n")
    monkeypatch.delenv("TRAINCTL_TOKEN", raising=False)
    assert main(["ls", "--json", "-s", secured.address, "--token-file", str(f)]) == 0
    monkeypatch.setenv("TRAINCTL_TOKEN", CLIENT_TOKEN)
    assert main(["ls", "--json", "-s", secured.address]) == 0
    monkeypatch.setenv("TRAINCTL_TOKEN", "wrong")
    assert main(["ls", "-s", secured.address]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_the_server_never_reads_the_clients_token_variable(tmp_path, monkeypatch):
    """A shell that exported TRAINCTL_TOKEN (and its file) for the CLI starts a server with
    auth off; the server's own variables turn it on."""
    f = tmp_path / "tokens"
    f.write_text("from-a-file\n")
    monkeypatch.setenv("TRAINCTL_TOKEN", "for-the-cli")
    monkeypatch.setenv("TRAINCTL_TOKEN_FILE", str(f))
    for d in ("open", "closed"):
        (tmp_path / d).mkdir()
    open_server = Cluster(tmp_path / "open")
    try:
        assert Client(open_server.address, token="").list() == []
    finally:
        open_server.stop()
    monkeypatch.delenv("TRAINCTL_TOKEN")
    monkeypatch.delenv("TRAINCTL_TOKEN_FILE")
    monkeypatch.setenv("TRAINCTL_SERVER_CLIENT_TOKEN_FILE", str(f))
    closed = Cluster(tmp_path / "closed")
    try:
        assert _code(lambda: Client(closed.address, token="").list()) == "UNAUTHENTICATED"
        assert Client(closed.address, token="from-a-file").list() == []
    finally:
        closed.stop()


def test_address_and_token_flags_have_help():
    from trainctl.client.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices
    for cmd, flag in (("server", "--listen"), ("worker", "--server"), ("worker", "--token"),
                      ("worker", "--token-file"), ("get", "--server"), ("get", "--token-file"),
                      ("server", "--client-token")):
        action = next(a for a in sub[cmd]._actions if flag in a.option_strings)
        assert action.help, (cmd, flag)
    server_env = " ".join(a.help or "" for a in sub["server"]._actions)
    assert "TRAINCTL_SERVER_CLIENT_TOKEN" in server_env and "env TRAINCTL_TOKEN)" not in server_env
