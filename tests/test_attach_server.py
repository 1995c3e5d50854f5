"""Attached runs, server side (issue 12): the Attach RPC, the run-token check on
Connect, knobs and SET_KNOB, lease expiry and the session's own end. In-process and
fast: the real server on a temp SQLite file, scripted SDK sessions over real gRPC."""
from __future__ import annotations

import asyncio
import contextlib
import math

import grpc
import pytest

from tests.scripted import RunningServer, ScriptedWorker, in_loop, running_server
from trainctl.server.app import ServerConfig, create_server
from trainctl.server.auth import Tokens
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.wire import struct_from_dict


class Session(ScriptedWorker):
    """An SDK's Connect stream: a Hello with `current` and `run_token`."""

    def __init__(self, channel, worker_id: str, current: pb.Heartbeat | None, run_token: str, metadata=None):
        self.worker_id = worker_id
        self._out = asyncio.Queue()
        self.received = []
        self._new = asyncio.Event()
        hello = pb.Hello(worker_id=worker_id, hostname="sdk", current=current, run_token=run_token)
        self.call = pb_grpc.WorkersStub(channel).Connect(self._messages(hello), metadata=metadata)
        self._reader = asyncio.create_task(self._read())

    async def refused(self) -> grpc.StatusCode | None:
        """The stream's status once it ended (None while it is open after 2 s)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 2.0)
            return await self.call.code()
        return None


SPEC = {"name": "spec-run", "model": {"name": "resnet10t"}, "data": {"dataset": "digits", "batch_size": 64},
        "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 0.01}, "train": {"epochs": 1}}


async def attach(srv: RunningServer, name="mine", **kw) -> pb.AttachResponse:
    return await srv.experiments.Attach(pb.AttachRequest(name=name, config=struct_from_dict({"lr": 0.1}), **kw))


async def connect(srv: RunningServer, a: pb.AttachResponse, *, token=None, worker_id=None, metadata=None) -> Session:
    s = Session(srv.channel, worker_id or a.worker_id,
                pb.Heartbeat(experiment_id=a.experiment.id, attempt=a.attempt),
                a.run_token if token is None else token, metadata)
    srv.workers.append(s)
    return s


async def get(srv: RunningServer, id: int) -> pb.Experiment:
    return await srv.experiments.Get(pb.GetRequest(id=id))


def knobs(s: Session, a: pb.AttachResponse, *ks: pb.Knob) -> None:
    s.send(knobs=pb.KnobDeclaration(experiment_id=a.experiment.id, attempt=a.attempt, knobs=list(ks)))


@in_loop
async def test_attach_creates_an_attached_run_that_no_worker_is_assigned(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        a = await attach(srv, tags=["sdk"])
        x = a.experiment
        assert (x.kind, x.state, x.attempt, a.attempt) == (pb.ATTACHED, pb.ASSIGNED, 1, 1)
        assert a.worker_id.startswith(f"attached-{x.id}-") and x.worker_id == a.worker_id
        assert len(a.run_token) >= 32 and a.lease_timeout_s == 5.0 and a.heartbeat_interval_s > 0
        assert list(x.tags) == ["sdk"] and x.spec["lr"] == 0.1
        stored = await srv.db(srv.store.get_experiment, x.id)
        assert stored.run_token_hash and a.run_token not in stored.run_token_hash  # only its hash is kept
        assert await srv.db(srv.store.claim_next, "w2", 0) is None  # the store never hands it out
        # The SDK's session is never given work, even once its run ended and its stream
        # stays open (idle) with a spec run queued; a worker gets that run.
        s = await connect(srv, a)
        await s.expect("welcome")
        s.state(x.id, 1, pb.COMPLETED)
        await srv.until(lambda: x.id not in srv.dispatcher.leases, what="released")
        y = await srv.experiments.Submit(pb.SubmitRequest(spec=struct_from_dict(SPEC)))
        for _ in range(4):
            await srv.dispatcher.run_once()
        w = await srv.worker("w1")
        got = await w.expect("assignment")
        assert got.experiment_id == y.id
        assert s.of_kind("assignment") == [] and len(w.of_kind("assignment")) == 1


@in_loop
async def test_attach_refuses_bad_input_naming_the_field(tmp_path):
    async with running_server(tmp_path) as srv:
        for req, field in ((pb.AttachRequest(name=""), "name"),
                           (pb.AttachRequest(name="x" * 200), "name"),
                           (pb.AttachRequest(name="x", tags=["bad tag!"]), "tags"),
                           (pb.AttachRequest(name="x", config=struct_from_dict({"a": {"b": math.nan}})), "config.a.b")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await srv.experiments.Attach(req)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.experiments.Attach(pb.AttachRequest(name="x", replay_of=999))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert await srv.db(srv.store.list_experiments) == []  # nothing half-created


@in_loop
async def test_adopt_only_with_the_right_run_token_and_session(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        a = await attach(srv)
        b = await attach(srv, name="other")
        for kw in ({"token": "forged"}, {"token": b.run_token},  # another run's token
                   {"worker_id": "w-not-the-session"},            # right token, wrong session id
                   {"token": ""}):                                # the attached id without a token
            s = await connect(srv, a, **kw)
            assert await s.refused() == grpc.StatusCode.PERMISSION_DENIED, kw
            assert s.of_kind("welcome") == []
        s = await connect(srv, a)
        await s.expect("welcome")
        assert srv.dispatcher.session_for(a.experiment.id) is not None  # adopted
        s.metrics(a.experiment.id, a.attempt, 1, [0, 1, 2])
        await s.expect("batch_ack")
        assert await srv.db(srv.store.count_metrics, a.experiment.id) == 3


@in_loop
async def test_another_session_cannot_speak_for_an_attached_run(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        a = await attach(srv)
        b = await attach(srv, name="other")
        s = await connect(srv, a)
        await s.expect("welcome")
        w = await srv.worker("w1")  # a worker-token holder
        w.metrics(a.experiment.id, a.attempt, 1, [0])
        w.state(a.experiment.id, a.attempt, pb.COMPLETED)
        stop = await w.expect("cancel")
        assert stop.kind == pb.STOP_FENCED and stop.experiment_id == a.experiment.id
        # b's own session cannot speak for a either.
        sb = await connect(srv, b)
        await sb.expect("welcome")
        sb.metrics(a.experiment.id, a.attempt, 1, [0])
        assert (await sb.expect("cancel")).kind == pb.STOP_FENCED
        # A worker reconnecting with a as its current run is fenced, not adopted.
        w2 = await srv.worker("w2", current=pb.Heartbeat(experiment_id=a.experiment.id, attempt=1))
        assert (await w2.expect("cancel")).kind == pb.STOP_FENCED
        assert await srv.db(srv.store.count_metrics, a.experiment.id) == 0
        assert (await get(srv, a.experiment.id)).state == pb.ASSIGNED
        s.heartbeat(a.experiment.id, a.attempt)  # its own session is still the one
        s.metrics(a.experiment.id, a.attempt, 1, [0])
        await s.expect("batch_ack")


@in_loop
async def test_knobs_declared_listed_and_set_with_checks(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        a = await attach(srv)
        xid = a.experiment.id
        s = await connect(srv, a)
        await s.expect("welcome")
        knobs(s, a, pb.Knob(name="tau", value=0.996, low=0.9, high=1.0), pb.Knob(name="eta", value=1.0))
        got = await srv.until(lambda: _knobs_of(srv, xid, 2), what="two knobs listed")
        assert [(k.name, k.value, k.HasField("low"), k.HasField("high")) for k in got] == \
            [("eta", 1.0, False, False), ("tau", 0.996, True, True)]

        async def control(name, value, **kw):
            return await srv.experiments.Control(pb.ControlRequest(
                experiment_id=xid, kind=pb.SET_KNOB, knob=name, value=value, wait_seconds=5, **kw))

        for name, value, words in (("nope", 0.5, "its knobs: eta, tau"), ("tau", 1.5, "[0.9, 1]"),
                                   ("tau", 0.5, "[0.9, 1]"), ("", 0.5, "knob")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await control(name, value)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), name
        with pytest.raises(grpc.aio.AioRpcError) as err:  # only SET_KNOB names a knob
            await srv.experiments.Control(pb.ControlRequest(experiment_id=xid, kind=pb.SET_LR, value=0.1, knob="tau"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert s.of_kind("control") == [] and await srv.db(srv.store.list_controls, xid) == []

        call = asyncio.create_task(control("tau", 0.95))
        cmd = await s.expect("control")
        assert (cmd.kind, cmd.knob, cmd.value, cmd.attempt) == (pb.SET_KNOB, "tau", 0.95, 1)
        s.send(ack=pb.ControlAck(experiment_id=xid, attempt=1, command_id=cmd.command_id, ok=True, applied_step=7,
                                 old_value=0.996, new_value=0.95))
        rec = await call
        assert (rec.status, rec.knob, rec.applied_step, rec.old_value, rec.new_value) == \
            (pb.APPLIED, "tau", 7, 0.996, 0.95)
        assert {k.name: k.value for k in (await get(srv, xid)).knobs} == {"eta": 1.0, "tau": 0.95}
        recs = (await srv.experiments.ListControls(pb.ListControlsRequest(experiment_id=xid))).records
        assert [(r.kind, r.knob, r.status) for r in recs] == [(pb.SET_KNOB, "tau", pb.APPLIED)]
        # A rejected one changes no value; a retry of the same id with another knob conflicts.
        call = asyncio.create_task(control("eta", 2.0, command_id="c2"))
        cmd = await s.expect("control", index=1)
        s.send(ack=pb.ControlAck(experiment_id=xid, attempt=1, command_id=cmd.command_id, ok=False,
                                 message="no", old_value=math.nan, new_value=math.nan))
        assert (await call).status == pb.REJECTED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await control("tau", 2.0, command_id="c2")
        assert err.value.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT)
        assert {k.name: k.value for k in (await get(srv, xid)).knobs} == {"eta": 1.0, "tau": 0.95}
        # A bad declaration (low > high) is not stored and does not break the stream.
        knobs(s, a, pb.Knob(name="bad", value=1.0, low=2.0, high=0.0))
        s.metrics(xid, 1, 1, [0])
        await s.expect("batch_ack")
        assert len((await get(srv, xid)).knobs) == 2


async def _knobs_of(srv, xid, n):
    got = list((await get(srv, xid)).knobs)
    return got if len(got) == n else None


@in_loop
async def test_spec_runs_list_their_steerable_values(tmp_path):
    async with running_server(tmp_path) as srv:
        spec = {**SPEC, "train": {"epochs": 1, "ema": {"decay": 0.999}}}
        y = await srv.experiments.Submit(pb.SubmitRequest(spec=struct_from_dict(spec)))
        x = await get(srv, y.id)
        assert x.kind == pb.SPEC
        assert {k.name: k.value for k in x.knobs} == {"lr": 0.05, "weight_decay": 0.01, "ema_decay": 0.999}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.experiments.Control(pb.ControlRequest(experiment_id=y.id, kind=pb.SET_KNOB, knob="lr", value=1))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "set-lr" in err.value.details()


@in_loop
async def test_lease_expiry_ends_an_attached_run_failed_never_requeued(tmp_path):
    async with running_server(tmp_path, lease_timeout=1.0) as srv:
        a = await attach(srv)
        never = await attach(srv, name="never-connected")
        s = await connect(srv, a)
        await s.expect("welcome")
        s.heartbeat(a.experiment.id, 1)
        w = await srv.worker("w1")  # an idle worker that must never get either run
        for xid in (a.experiment.id, never.experiment.id):
            x = await srv.until(lambda xid=xid: _final(srv, xid), timeout=10, what=f"{xid} final")
            assert x.state == pb.FAILED and "the attached process went silent for 1 s" in x.message, x.message
            assert x.attempt == 1  # never claimed again
        assert (await s.expect("cancel")).kind == pb.STOP_FENCED
        assert w.of_kind("assignment") == []
        s.metrics(a.experiment.id, 1, 1, [0])  # late data from the fenced run is refused
        await asyncio.sleep(0.3)
        assert await srv.db(srv.store.count_metrics, a.experiment.id) == 0


async def _final(srv, xid):
    x = await get(srv, xid)
    return x if x.state in (pb.COMPLETED, pb.FAILED, pb.CANCELLED, pb.QUEUED) else None


@in_loop
async def test_heartbeats_keep_it_alive_and_its_state_update_ends_it(tmp_path):
    async with running_server(tmp_path, lease_timeout=1.0) as srv:
        a = await attach(srv)
        xid = a.experiment.id
        s = await connect(srv, a)
        await s.expect("welcome")
        for _ in range(12):  # 2.4 s of heartbeats: more than two lease timeouts
            s.heartbeat(xid, 1)
            await asyncio.sleep(0.2)
        assert (await get(srv, xid)).state == pb.ASSIGNED
        s.state(xid, 1, pb.RUNNING)
        s.state(xid, 1, pb.COMPLETED, "done")
        x = await srv.until(lambda: _final(srv, xid), what="final")
        assert (x.state, x.message) == (pb.COMPLETED, "done")
        assert xid not in srv.dispatcher.leases and xid not in srv.dispatcher.attached


@in_loop
async def test_reconnect_readopts_and_resends_pending_commands(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        a = await attach(srv)
        xid = a.experiment.id
        # A command sent before the SDK connects stays PENDING and reaches it on Connect.
        rec = await srv.experiments.Control(pb.ControlRequest(experiment_id=xid, kind=pb.SET_LR, value=0.01))
        assert rec.status == pb.PENDING
        s = await connect(srv, a)
        cmd = await s.expect("control")
        assert (cmd.command_id, cmd.kind, cmd.value) == (rec.command_id, pb.SET_LR, 0.01)
        await s.close()
        await asyncio.sleep(0.1)
        s2 = await connect(srv, a)  # same session id, a new stream (the old one closed)
        await s2.expect("welcome")
        assert (await s2.expect("control")).command_id == rec.command_id  # still PENDING: sent again
        s2.send(ack=pb.ControlAck(experiment_id=xid, attempt=1, command_id=rec.command_id, ok=True,
                                  applied_step=3, old_value=0.1, new_value=0.01))
        recs = await srv.until(lambda: _applied(srv, xid), what="applied")
        assert recs[0].applied_step == 3


async def _applied(srv, xid):
    recs = await srv.db(srv.store.list_controls, xid)
    return recs if recs and recs[0].status == "APPLIED" else None


@in_loop
async def test_with_auth_a_client_token_connects_only_for_its_own_run(tmp_path):
    config = ServerConfig(db_url=f"sqlite:///{tmp_path / 'trainctl.db'}", lease_timeout=5.0, heartbeat_interval=0.2,
                          grace=0.5, tokens=Tokens(client=("ctok",), worker=("wtok",)))
    server, port = create_server("127.0.0.1:0", config)
    await server.start()
    srv = RunningServer(server, port)
    client = (("authorization", "Bearer ctok"),)
    try:
        a = await srv.experiments.Attach(pb.AttachRequest(name="mine"), metadata=client)
        b = await srv.experiments.Attach(pb.AttachRequest(name="other"), metadata=client)
        # A client token without a run token cannot open Connect (it would act as a worker).
        plain = Session(srv.channel, "w-fake", None, "", client)
        srv.workers.append(plain)
        assert await plain.refused() == grpc.StatusCode.PERMISSION_DENIED
        # ...nor with a wrong one.
        bad = await connect(srv, a, token=b.run_token, metadata=client)
        assert await bad.refused() == grpc.StatusCode.PERMISSION_DENIED
        s = await connect(srv, a, metadata=client)
        await s.expect("welcome")
        s.metrics(a.experiment.id, 1, 1, [0, 1])
        await s.expect("batch_ack")
        s.metrics(b.experiment.id, 1, 1, [0])  # another run: fenced
        assert (await s.expect("cancel")).experiment_id == b.experiment.id
        assert await srv.db(srv.store.count_metrics, b.experiment.id) == 0
        assert await srv.db(srv.store.count_metrics, a.experiment.id) == 2
    finally:
        for w in srv.workers:
            await w.close()
        await srv.channel.close()
        await server.stop(0.5)


@contextlib.asynccontextmanager
async def serve(db, **config):
    """The real server on `db` (a path), with its port: what `running_server` gives, plus
    a second start on the same file (a server restart)."""
    cfg = ServerConfig(db_url=f"sqlite:///{db}", heartbeat_interval=0.2, grace=0.5, **config)
    server, port = create_server("127.0.0.1:0", cfg)
    await server.start()
    srv = RunningServer(server, port)
    try:
        yield srv, port
    finally:
        for w in srv.workers:
            await w.close()
        await srv.channel.close()
        await server.stop(0.5)


@in_loop
async def test_after_a_server_restart_the_sdk_readopts_with_its_token(tmp_path):
    db = tmp_path / "trainctl.db"
    async with serve(db, lease_timeout=2.0) as (srv, _):
        a = await attach(srv)
        s = await connect(srv, a)
        await s.expect("welcome")
        s.metrics(a.experiment.id, 1, 1, [0, 1])
        await s.expect("batch_ack")
    async with serve(db, lease_timeout=2.0) as (srv, _):
        assert a.experiment.id in srv.dispatcher.attached  # a grace lease, attached-only
        w = await srv.worker("w1", current=pb.Heartbeat(experiment_id=a.experiment.id, attempt=1))  # fenced
        s = await connect(srv, a)
        await s.expect("welcome")
        s.metrics(a.experiment.id, 1, 2, [2, 3])
        await s.expect("batch_ack")
        assert s.of_kind("cancel") == [] and w.of_kind("assignment") == []
        assert (await w.expect("cancel")).kind == pb.STOP_FENCED
        assert await srv.db(srv.store.count_metrics, a.experiment.id) == 4
        for _ in range(25):  # 5 s: longer than lease + grace, kept alive by heartbeats
            s.heartbeat(a.experiment.id, 1)
            await asyncio.sleep(0.2)
        assert (await get(srv, a.experiment.id)).state == pb.ASSIGNED


@in_loop
async def test_cli_set_and_client_set_steer_a_knob(tmp_path, capsys):
    from trainctl.client.cli import main
    from trainctl.client.sdk import Client

    async with serve(tmp_path / "trainctl.db", lease_timeout=5.0) as (srv, port):
        a = await attach(srv)
        xid = a.experiment.id
        s = await connect(srv, a)
        await s.expect("welcome")
        knobs(s, a, pb.Knob(name="tau", value=0.99, low=0.9, high=1.0))
        await srv.until(lambda: _knobs_of(srv, xid, 1), what="knob declared")

        async def acker(index, applied_step):
            cmd = await s.expect("control", index=index)
            s.send(ack=pb.ControlAck(experiment_id=xid, attempt=1, command_id=cmd.command_id, ok=True,
                                     applied_step=applied_step, old_value=math.nan, new_value=cmd.value))

        loop = asyncio.get_running_loop()
        task = asyncio.create_task(acker(0, 5))
        rc = await loop.run_in_executor(None, main, ["set", str(xid), "tau", "0.95", "--server", f"127.0.0.1:{port}",
                                                     "--json"])
        await task
        assert rc == 0 and '"APPLIED"' in capsys.readouterr().out
        task = asyncio.create_task(acker(1, 9))
        with Client(f"127.0.0.1:{port}") as c:
            r = await loop.run_in_executor(None, lambda: c.set(xid, "tau", 0.92))
            await task
            assert (r.status, r.knob, r.applied_step, r.new_value) == ("APPLIED", "tau", 9, 0.92)
            x = await loop.run_in_executor(None, c.get, xid)
            assert x.kind == "ATTACHED" and x.knobs == ({"name": "tau", "value": 0.92, "low": 0.9, "high": 1.0},)
            with pytest.raises(Exception) as err:  # out of bounds: the server's INVALID_ARGUMENT
                await loop.run_in_executor(None, lambda: c.set(xid, "tau", 2.0))
            assert "[0.9, 1]" in str(err.value)
        rc = await loop.run_in_executor(None, main, ["set", str(xid), "nope", "1", "--server", f"127.0.0.1:{port}"])
        assert rc != 0
        assert "its knobs: tau" in capsys.readouterr().err


KEY = "k" * 20 + "0123456789_-ABCDEF"  # 38 URL-safe characters


async def keyed(srv, key=KEY, name="mine", **kw):
    return await srv.experiments.Attach(pb.AttachRequest(name=name, config=struct_from_dict({"lr": 0.1}), **kw),
                                        metadata=(("trainctl-attach-key", key),))


@in_loop
async def test_an_attach_retried_with_its_key_returns_the_same_run_not_a_second(tmp_path):
    """The SDK retries an Attach whose reply was lost with the same attach key: the same
    experiment, token and session come back (also after a server restart), never a
    second experiment; without a key each Attach is a new run, as before."""
    db = tmp_path / "trainctl.db"
    async with serve(db, lease_timeout=5.0) as (srv, _):
        orig = await srv.experiments.Submit(pb.SubmitRequest(spec=struct_from_dict(SPEC)))
        a = await keyed(srv, replay_of=orig.id)
        b = await keyed(srv, replay_of=orig.id)
        assert (b.experiment.id, b.worker_id, b.run_token, b.attempt) == \
               (a.experiment.id, a.worker_id, a.run_token, a.attempt)
        assert a.run_token == KEY  # the key is the run token: only its hash is stored
        assert len(await srv.db(srv.store.list_experiments)) == 2  # the spec run and ONE attached run
        # A different name with the same key is a client bug: refused, naming the metadata.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await keyed(srv, name="other", replay_of=orig.id)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "trainctl-attach-key" in err.value.details()
        for bad in ("short", "x" * 40 + "!", "y" * 200):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await keyed(srv, key=bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "trainctl-attach-key" in err.value.details()
        c, d = await attach(srv), await attach(srv)  # no key: two runs
        assert c.experiment.id != d.experiment.id and c.run_token != d.run_token
        s = await connect(srv, b)  # the retried answer's session and token work
        await s.expect("welcome")
    async with serve(db, lease_timeout=5.0) as (srv, _):
        again = await keyed(srv, replay_of=orig.id)
        assert again.experiment.id == a.experiment.id
        assert len(await srv.db(srv.store.list_experiments)) == 4


@in_loop
async def test_a_connected_attached_run_gets_a_command_without_a_read_first_and_every_command_ends(tmp_path):
    """set-lr's short path (control_rpc): a live attached run whose SDK is connected is
    RUNNING, so the command is stored and sent with no get_experiment before it. Whatever
    the path, no command stays PENDING once the run ended (DESIGN.md invariants)."""
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        a = await attach(srv)
        xid = a.experiment.id
        s = await connect(srv, a)
        await s.expect("welcome")
        s.state(xid, 1, pb.RUNNING)
        await srv.until(lambda: _state_is(srv, xid, pb.RUNNING), what="running")
        reads = []
        get_experiment = srv.store.get_experiment
        srv.store.get_experiment = lambda id: reads.append(id) or get_experiment(id)
        call = asyncio.ensure_future(srv.experiments.Control(
            pb.ControlRequest(experiment_id=xid, kind=pb.SCALE_LR, value=0.5, wait_seconds=5)))
        cmd = await s.expect("control")
        assert (cmd.experiment_id, cmd.attempt, cmd.kind, cmd.value) == (xid, 1, pb.SCALE_LR, 0.5)
        assert reads == []  # stored and sent without reading the run
        s.send(ack=pb.ControlAck(experiment_id=xid, attempt=1, command_id=cmd.command_id, ok=True, applied_step=7,
                                 old_value=0.1, new_value=0.05))
        rec = await call
        assert (rec.status, rec.applied_step, rec.new_value) == (pb.APPLIED, 7, 0.05)
        srv.store.get_experiment = get_experiment

        # The run ends in the store while the server still holds its lease (the moment
        # between storing a final state and releasing the run): a command of that moment
        # is stored EXPIRED, with the reason, never PENDING.
        await srv.db(srv.store.transition, xid, 1, "COMPLETED", message="done")
        assert srv.dispatcher.attached_attempt(xid) == 1
        rec = await srv.experiments.Control(pb.ControlRequest(experiment_id=xid, kind=pb.SET_LR, value=0.01))
        assert rec.status == pb.EXPIRED and "ended COMPLETED" in rec.message
        # Once released, the long path refuses it as before; an unknown id is NOT_FOUND.
        srv.dispatcher.release(xid, 1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.experiments.Control(pb.ControlRequest(experiment_id=xid, kind=pb.SET_LR, value=0.01))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.experiments.Control(pb.ControlRequest(experiment_id=xid + 99, kind=pb.SET_LR, value=0.01))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        recs = await srv.db(srv.store.list_controls, xid)
        assert [r.status for r in recs] == ["APPLIED", "EXPIRED"]


async def _state_is(srv, xid, state):
    return (await get(srv, xid)).state == state
