"""The worker's local endpoint (workers/local_endpoint.py): what a submitted command's SDK
talks to. In-process with a real Agent object and real gRPC on the unix socket; the
full path (a real server, a real child process calling `trainctl.init()`) is
test_child_steered_through_the_endpoint.

Trust: only this attempt's token opens any method (forged or missing: UNAUTHENTICATED),
and the token speaks only for its experiment and attempt (PERMISSION_DENIED)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import stat
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest

from trainctl.outbox import _Row
from trainctl.transport import auth_metadata
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.workers.agent import Agent, _Run
from trainctl.workers.local_endpoint import LocalEndpoint

from trainctl.server.app import ServerConfig, create_server
from trainctl.server.auth import Tokens


class ThreadServer:
    """The real server (create_server, SQLite file, local artifact store) on its own event
    loop in a thread, so the synchronous Agent and SDK can be driven from the test."""

    def __init__(self, loop, server, port):
        self.loop, self.server, self.port = loop, server, port
        self.address = f"127.0.0.1:{port}"
        self.store = server.live.store
        self.channel = grpc.insecure_channel(self.address)

    def kick(self):
        self.loop.call_soon_threadsafe(self.server.dispatcher.kick)

    def experiments(self):
        return pb_grpc.ExperimentsStub(self.channel)

    def artifacts(self):
        return pb_grpc.ArtifactsStub(self.channel)

    @staticmethod
    def until(predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)
        return value


@contextlib.contextmanager
def server_in_thread(tmp_path, port: int = 0, lease_timeout: float = 10.0, tokens: Tokens = Tokens()):
    loop = asyncio.new_event_loop()
    box: dict = {}
    ready = threading.Event()

    async def main():
        config = ServerConfig(db_url=f"sqlite:///{tmp_path / 'trainctl.db'}", lease_timeout=lease_timeout,
                              heartbeat_interval=0.2, grace=0.5, artifacts=str(tmp_path / "artifacts"),
                              tokens=tokens)
        try:
            server, bound = create_server(f"127.0.0.1:{port}", config)
            await server.start()
            box.update(server=server, port=bound, stop=asyncio.Event())
        finally:
            ready.set()
        await box["stop"].wait()
        await server.stop(0.5)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(30)
    assert "server" in box, "the server did not start"
    srv = ThreadServer(loop, box["server"], box["port"])
    try:
        yield srv
    finally:
        srv.channel.close()
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(15)


def _assignment(exp_id=7, attempt=2, **kw) -> pb.Assignment:
    return pb.Assignment(experiment_id=exp_id, attempt=attempt, name="job", store_id="s" * 32, **kw)


class _Inbox:
    def __init__(self):
        self.cancelled = ""

    def put(self, cmd):
        raise AssertionError("a code run's control must go to its endpoint, not the spec inbox")

    def cancel(self, reason):
        self.cancelled = reason

    def fence(self, reason):
        self.cancelled = reason


@pytest.fixture
def endpoint(tmp_path):
    agent = Agent("127.0.0.1:1", workdir=str(tmp_path / "w"), worker_id="w1")
    a = _assignment(controls=[
        pb.ControlRecord(command_id="old", kind=pb.SET_LR, value=0.5, status=pb.APPLIED, applied_step=3),
        pb.ControlRecord(command_id="sched", kind=pb.SCALE_LR, value=2.0, status=pb.PENDING, at_step=40),
        pb.ControlRecord(command_id="live", kind=pb.SET_KNOB, knob="tau", value=0.9, status=pb.PENDING)])
    ep = LocalEndpoint(agent, a).start()
    agent.current = _Run(a, _Inbox())
    yield ep
    ep.stop()


class _Child:
    """A scripted SDK: one Connect stream over the endpoint's socket."""

    def __init__(self, ep: LocalEndpoint, token: str | None = None, current=(7, 2), worker_id="code-7-a2"):
        self.channel = grpc.insecure_channel(ep.address)
        self.md = auth_metadata(ep.token if token is None else token)
        self.out: queue.Queue = queue.Queue()
        self.got: queue.Queue = queue.Queue()
        hello = pb.Hello(worker_id=worker_id, run_token=ep.token,
                         current=pb.Heartbeat(experiment_id=current[0], attempt=current[1]))
        self.out.put(pb.WorkerMessage(hello=hello))
        self.call = pb_grpc.WorkersStub(self.channel).Connect(iter(self.out.get, None), metadata=self.md)
        self.error: list = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for msg in self.call:
                self.got.put(msg)
        except grpc.RpcError as exc:
            self.error.append(exc)
            self.got.put(None)

    def send(self, **kw):
        self.out.put(pb.WorkerMessage(**kw))

    def expect(self, kind: str, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            msg = self.got.get(timeout=max(0.01, deadline - time.monotonic()))
            if msg is None:
                raise AssertionError(f"stream ended: {self.error}")
            if msg.WhichOneof("msg") == kind:
                return getattr(msg, kind)

    def ended(self, timeout=10.0) -> grpc.RpcError:
        deadline = time.monotonic() + timeout
        while not self.error and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.error, "the stream was not refused"
        return self.error[0]

    def close(self):
        self.out.put(None)
        self.channel.close()


def _rows_in(outbox) -> list:
    return [i for i in list(outbox._items) if isinstance(i, _Row)]


def _states_in(outbox) -> list:
    return [i.state.state for i in list(outbox._items) if isinstance(i, pb.WorkerMessage) and i.WhichOneof("msg") == "state"]


def test_socket_is_private_and_removed(endpoint):
    path = endpoint.address[len("unix:"):]
    d = os.path.dirname(path)
    assert len(path) < 100 and path.startswith("/tmp/")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700 and stat.S_ISSOCK(os.stat(path).st_mode)
    env = endpoint.env()
    assert env["TRAINCTL_SERVER"] == endpoint.address and env["TRAINCTL_TOKEN"] == endpoint.token
    assert (env["TRAINCTL_EXPERIMENT_ID"], env["TRAINCTL_ATTEMPT"], env["TRAINCTL_TLS_CA"]) == ("7", "2", "")
    assert os.path.isdir(env["TRAINCTL_CHECKPOINT_DIR"]) and "TRAINCTL_CHECKPOINT_NAME" not in env
    endpoint.stop()
    assert not os.path.exists(d) and endpoint.agent.endpoint is None


def test_forged_or_missing_token_is_unauthenticated(endpoint):
    with grpc.insecure_channel(endpoint.address) as ch:
        exps, arts = pb_grpc.ExperimentsStub(ch), pb_grpc.ArtifactsStub(ch)
        forged = auth_metadata("x" + endpoint.token[1:])
        calls = [lambda md: exps.Attach(pb.AttachRequest(name="x"), metadata=md, timeout=5),
                 lambda md: exps.Get(pb.GetRequest(id=7), metadata=md, timeout=5),
                 lambda md: list(arts.Download(pb.ArtifactRef(experiment_id=7, name="a"), metadata=md, timeout=5)),
                 lambda md: arts.Upload(iter([pb.UploadChunk(header=pb.UploadHeader(
                     artifact=pb.Artifact(experiment_id=7, kind=pb.ARTIFACT_FILE, name="f")))]), metadata=md, timeout=5),
                 lambda md: arts.ListArtifacts(pb.ListArtifactsRequest(experiment_id=7), metadata=md, timeout=5)]
        for md in (None, forged, auth_metadata(endpoint.token + "x")):
            for call in calls:
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    child = _Child(endpoint, token="forged-" + endpoint.token)
    assert child.ended().code() == grpc.StatusCode.UNAUTHENTICATED
    child.close()
    assert not _rows_in(endpoint.agent.outbox)


def test_another_experiment_is_permission_denied(endpoint):
    md = auth_metadata(endpoint.token)
    with grpc.insecure_channel(endpoint.address) as ch:
        exps, arts = pb_grpc.ExperimentsStub(ch), pb_grpc.ArtifactsStub(ch)
        assert exps.Get(pb.GetRequest(id=7), metadata=md, timeout=5).id == 7
        denied = [lambda: exps.Get(pb.GetRequest(id=8), metadata=md, timeout=5),
                  lambda: list(arts.Download(pb.ArtifactRef(experiment_id=8, name="a"), metadata=md, timeout=5)),
                  lambda: list(arts.Download(pb.ArtifactRef(sha256="ab" * 32), metadata=md, timeout=5)),
                  lambda: arts.ListArtifacts(pb.ListArtifactsRequest(experiment_id=0), metadata=md, timeout=5),
                  lambda: arts.CollectGarbage(pb.GcRequest(), metadata=md, timeout=5)]
        for art in (pb.Artifact(experiment_id=8, attempt=2, kind=pb.ARTIFACT_FILE, name="f"),
                    pb.Artifact(experiment_id=7, attempt=1, kind=pb.ARTIFACT_CHECKPOINT, name="f"),
                    pb.Artifact(experiment_id=7, attempt=2, kind=pb.ARTIFACT_CODE, name="code")):
            denied.append(lambda art=art: arts.Upload(iter([pb.UploadChunk(header=pb.UploadHeader(artifact=art))]),
                                                      metadata=md, timeout=5))
        for call in denied:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    other = _Child(endpoint, current=(8, 2))
    err = other.ended()
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "experiment 8" in err.details()
    other.close()
    # A good stream that then speaks for another attempt is cut off; nothing of it goes up.
    child = _Child(endpoint)
    child.expect("welcome")
    child.send(metrics=pb.MetricBatch(experiment_id=7, attempt=1, seq=1, scope=pb.STEP, names=["loss"],
                                      rows=[pb.MetricRow(step=0, values=[1.0])]))
    err = child.ended()
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "attempt 1" in err.details()
    child.close()
    assert not _rows_in(endpoint.agent.outbox)


def test_relay_both_ways(endpoint):
    agent, outbox = endpoint.agent, endpoint.agent.outbox
    md = auth_metadata(endpoint.token)
    with grpc.insecure_channel(endpoint.address) as ch:
        resp = pb_grpc.ExperimentsStub(ch).Attach(pb.AttachRequest(name="ignored"), metadata=md, timeout=5)
    assert (resp.experiment.id, resp.attempt, resp.experiment.kind, resp.run_token) == (7, 2, pb.CODE, endpoint.token)
    # Re-applied at their steps: the earlier attempt's command at its applied step, the scheduled one at its own.
    assert {(c.command_id, c.at_step) for c in resp.controls} == {("old", 3), ("sched", 40)}

    child = _Child(endpoint)
    child.expect("welcome")
    assert child.expect("control").command_id == "live"  # pending live command: sent on connect
    child.send(state=pb.StateUpdate(experiment_id=7, attempt=2, state=pb.RUNNING))
    for seq, steps in ((1, range(0, 5)), (2, range(5, 8)), (1, range(0, 5))):  # the last: a resend
        child.send(metrics=pb.MetricBatch(experiment_id=7, attempt=2, seq=seq, scope=pb.STEP, names=["loss", "acc"],
                                          rows=[pb.MetricRow(step=s, wall_time=1.0, values=[s, float("nan")])
                                                for s in steps]))
        assert child.expect("batch_ack").seq == max(seq, endpoint._acked["code-7-a2"])  # the resend: acked as 2
    rows = _rows_in(outbox)
    assert [r.step for r in rows] == list(range(8)) and rows[0].values == {"loss": 0.0}  # NaN: not logged
    assert agent.current.step == 7 and endpoint.step == 7
    # A second SDK session in the same command (another trainctl.init()) numbers from 1 again: kept.
    second = _Child(endpoint, worker_id="code-7-a2-2")
    second.expect("welcome")
    second.send(metrics=pb.MetricBatch(experiment_id=7, attempt=2, seq=1, scope=pb.EPOCH, names=["val"],
                                       rows=[pb.MetricRow(step=8, values=[0.5])]))
    assert second.expect("batch_ack").seq == 1
    second.close()
    assert [r.step for r in _rows_in(outbox)] == list(range(9))

    # Server -> child: this attempt's control and cancel; another attempt's are not relayed.
    agent._on_message(pb.ServerMessage(control=pb.ControlCommand(experiment_id=7, attempt=1, command_id="stale")))
    agent._on_message(pb.ServerMessage(control=pb.ControlCommand(experiment_id=7, attempt=2, command_id="c1",
                                                                 kind=pb.SET_LR, value=0.01)))
    assert child.expect("control").command_id == "c1"
    child.send(ack=pb.ControlAck(experiment_id=7, attempt=2, command_id="c1", ok=True, applied_step=8))
    child.send(knobs=pb.KnobDeclaration(experiment_id=7, attempt=2, knobs=[pb.Knob(name="tau", value=0.5)]))
    child.send(state=pb.StateUpdate(experiment_id=7, attempt=2, state=pb.COMPLETED, summary={"acc": 0.9}))
    deadline = time.monotonic() + 5
    while endpoint.final_state is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert endpoint.final_state.state == pb.COMPLETED and endpoint.final_state.summary["acc"] == 0.9
    final = child.expect("batch_ack")
    assert final.final and final.seq == 2  # taken here: the SDK's finish() is done
    kinds = [i.WhichOneof("msg") for i in list(outbox._items) if isinstance(i, pb.WorkerMessage)]
    assert kinds == ["state", "ack", "knobs"]
    assert _states_in(outbox) == [pb.RUNNING]  # the final state stays here: the exit code decides
    with grpc.insecure_channel(endpoint.address) as ch:
        assert pb_grpc.ExperimentsStub(ch).Get(pb.GetRequest(id=7), metadata=md, timeout=5).state == pb.COMPLETED

    # A reconnect gets what the child has not acked yet ("live"), not what it has ("c1").
    child.close()
    again = _Child(endpoint)
    again.expect("welcome")
    assert again.expect("control").command_id == "live"
    agent._on_message(pb.ServerMessage(cancel=pb.CancelRun(experiment_id=7, attempt=2, kind=pb.STOP_CANCELLED,
                                                           reason="by a client")))
    assert again.expect("cancel").reason == "by a client"
    assert agent.current.inbox.cancelled == "by a client"  # the agent's run sees it too (SIGTERM)
    again.close()


# ---------------------------------------------------------------------- the whole path

CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    import trainctl

    run = trainctl.init()               # joins the experiment from the environment
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    run.attach(opt)
    tau = run.knob("tau", 0.5, low=0.0, high=1.0)
    step = 0
    while not os.path.exists("stop") and step < 20000:
        run.step()
        run.log(loss=float(step), tau=tau.value)
        step += 1
        time.sleep(0.005)
    with open("notes.txt", "w") as f:
        f.write("hello")
    run.save("notes.txt")
    run.save({"w": [1, 2, 3]}, "obj.pt")
    run.save_checkpoint({"w": 1})
    print("steps", step, "resumed", run.resumed, "id", run.id, flush=True)
    print("missing", run.finish(timeout=30), flush=True)
""")


CLIENT, WORKER = "client-" + "c" * 32, "worker-" + "w" * 32


@pytest.mark.slow
def test_child_steered_through_the_endpoint(tmp_path):
    # Auth on: the worker holds a worker token, the command only its attempt's token.
    with server_in_thread(tmp_path, tokens=Tokens(client=(CLIENT,), worker=(WORKER,))) as srv:
        md = auth_metadata(CLIENT)
        agent = Agent(srv.address, workdir=str(tmp_path / "w"), worker_id="w1", token=WORKER)
        agent._ready.set()
        threading.Thread(target=agent._receive_forever, daemon=True).start()
        x = srv.store.create_experiment("code-x", {"name": "code-x"})
        srv.kick()
        a = agent.assignments.get(timeout=20)
        assert a.experiment_id == x.id
        ep = LocalEndpoint(agent, a).start()
        assert ep.env()["TRAINCTL_TOKEN"] not in (CLIENT, WORKER)
        run = _Run(a, _Inbox())
        agent.current = run
        agent._state(run, pb.RUNNING)
        (tmp_path / "child.py").write_text(CHILD)
        log = open(tmp_path / "child.log", "w")
        child = subprocess.Popen([sys.executable, "child.py"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                 env={**{k: v for k, v in os.environ.items() if not k.startswith("TRAINCTL_")},
                                      **ep.env()})
        try:
            stub = srv.experiments()
            srv.until(lambda: [k for k in srv.store.list_knobs(x.id) if k.name == "tau"], 90, "the knob declared")
            lr = stub.Control(pb.ControlRequest(experiment_id=x.id, kind=pb.SET_LR, value=0.05, wait_seconds=20),
                              metadata=md)
            knob = stub.Control(pb.ControlRequest(experiment_id=x.id, kind=pb.SET_KNOB, knob="tau", value=0.9,
                                                  wait_seconds=20), metadata=md)
            assert lr.status == knob.status == pb.APPLIED, (lr, knob)
            assert lr.applied_step > 0 and knob.applied_step >= lr.applied_step
            (tmp_path / "stop").touch()
            assert child.wait(120) == 0, (tmp_path / "child.log").read_text()
        finally:
            if child.poll() is None:
                child.kill()
            log.close()
        out = (tmp_path / "child.log").read_text()
        assert "missing []" in out and "resumed False" in out and f"id {x.id}" in out, out
        steps = int(out.split("steps ")[1].split()[0])
        # The child's COMPLETED stayed on the worker; the worker reports the exit code's verdict.
        assert ep.final_state.state == pb.COMPLETED
        assert srv.store.get_experiment(x.id).state == "RUNNING"
        agent._state(run, pb.COMPLETED)
        srv.until(lambda: srv.store.get_experiment(x.id).state == "COMPLETED", 20, "COMPLETED")
        series = {s.name: dict(zip(s.steps, s.values)) for s in srv.store.get_metrics(x.id)}
        assert sorted(series["loss"]) == list(range(steps))  # every step once
        assert all(series["lr"][s] == (0.05 if s >= lr.applied_step else 0.1) for s in range(steps))
        assert all(series["tau"][s] == (0.9 if s >= knob.applied_step else 0.5) for s in range(steps))
        assert {k.name: k.value for k in srv.store.list_knobs(x.id)}["tau"] == 0.9
        arts = srv.artifacts().ListArtifacts(pb.ListArtifactsRequest(experiment_id=x.id), metadata=md).artifacts
        assert {(r.name, r.kind, r.attempt) for r in arts} == {
            ("notes.txt", pb.ARTIFACT_FILE, 1), ("obj.pt", pb.ARTIFACT_FILE, 1),
            (f"ckpt-{steps}-a1.pt", pb.ARTIFACT_CHECKPOINT, 1)}
        assert (ep.checkpoint_dir / f"ckpt-{steps}-a1.pt").is_file()
        ep.stop()
        agent.stopping.set()


def test_fenced_attempt_sends_nothing_more(endpoint):
    agent, md = endpoint.agent, auth_metadata(endpoint.token)
    child = _Child(endpoint)
    child.expect("welcome")
    agent._on_message(pb.ServerMessage(cancel=pb.CancelRun(experiment_id=7, attempt=2, kind=pb.STOP_FENCED,
                                                           reason="lease lost")))
    assert child.expect("cancel").kind == pb.STOP_FENCED and endpoint.fenced
    child.send(ack=pb.ControlAck(experiment_id=7, attempt=2, command_id="live", ok=True))
    child.send(state=pb.StateUpdate(experiment_id=7, attempt=2, state=pb.RUNNING))
    child.send(heartbeat=pb.Heartbeat(experiment_id=7, attempt=2, step=3))
    deadline = time.monotonic() + 5
    while endpoint.step != 3 and time.monotonic() < deadline:  # (the heartbeat: read after the others)
        time.sleep(0.02)
    assert endpoint.step == 3 and not [i for i in list(agent.outbox._items) if isinstance(i, pb.WorkerMessage)]
    with grpc.insecure_channel(endpoint.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ArtifactsStub(ch).Upload(iter([pb.UploadChunk(header=pb.UploadHeader(artifact=pb.Artifact(
                experiment_id=7, attempt=2, kind=pb.ARTIFACT_CHECKPOINT, name="ckpt-3-a2.pt")))]), metadata=md, timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "fenced" in err.value.details()
    child.close()
