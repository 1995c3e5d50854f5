"""The server core's invariants (DESIGN.md, issue 10), in-process and fast: the real
server and store on a temp SQLite file, scripted worker sessions over real gRPC
loopback (tests/scripted.py), faults injected for real (a SQLite write lock held by
another connection, a stalled event loop, forged messages on a real stream).

Leases, fencing, forged messages and store outages; commands ending EXPIRED and
command ids scoped per experiment; the assignment's lineage fields; Cancel. The lease
clock's arithmetic is also checked with a fake time source (test_lease_clock_*)."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

import grpc
import pytest

from trainctl.server.leases import DbHealth, LeaseClock
from trainctl.server.store import ControlRecord, dialects
from trainctl.server.store.errors import StoreUnavailable
from trainctl.v1 import trainctl_pb2 as pb

from tests.scripted import in_loop, running_server

SPEC = {"name": "x"}


async def _assigned(srv, worker_id="w1", **kw):
    """A queued experiment, a worker, and the assignment it got."""
    x = await srv.db(srv.store.create_experiment, "x", SPEC, **kw)
    srv.dispatcher.kick()
    w = await srv.worker(worker_id)
    a = await w.expect("assignment")
    assert a.experiment_id == x.id
    return x, w, a


def _loss(store, exp_id):
    (s,) = store.get_metrics(exp_id, names=["loss"])
    return dict(zip(s.steps, s.values))


# ---------------------------------------------------------------- leases


@in_loop
async def test_lease_expiry_requeues_and_fences_the_attempt(tmp_path):
    async with running_server(tmp_path, lease_timeout=1.0) as srv:
        x, w1, a = await _assigned(srv)
        w1.state(x.id, a.attempt, pb.RUNNING)
        w1.metrics(x.id, a.attempt, 1, range(0, 10))
        await w1.expect("batch_ack")
        # w1 goes silent: its lease expires, the experiment is requeued, w1 is told why.
        stop = await w1.expect("cancel", timeout=5)
        assert (stop.experiment_id, stop.attempt, stop.kind) == (x.id, a.attempt, pb.STOP_FENCED)
        y = await srv.db(srv.store.get_experiment, x.id)
        assert (y.state, y.restarts) == ("QUEUED", 1) and "no heartbeat" in y.message
        # The next attempt resumes within what the store holds: steps 0..9, lineage of
        # this store; w1's late batch is refused (nothing stored, told once).
        w2 = await srv.worker("w2")
        a2 = await w2.expect("assignment")
        assert (a2.attempt, a2.delivered_steps, a2.delivered_epochs) == (2, 10, 0)
        assert a2.store_id == await srv.db(srv.store.store_id) and len(a2.store_id) == 32
        w1.metrics(x.id, a.attempt, 2, range(10, 20), value=666.0)
        w1.state(x.id, a.attempt, pb.COMPLETED)
        await w1.expect("cancel", index=1)
        assert sorted(_loss(srv.store, x.id)) == list(range(10))
        y = await srv.db(srv.store.get_experiment, x.id)
        assert (y.state, y.attempt, y.worker_id) == ("ASSIGNED", 2, "w2")


@in_loop
async def test_assignment_carries_the_stored_prefix(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, w1, a = await _assigned(srv)
        w1.metrics(x.id, a.attempt, 1, [s for s in range(100) if s != 70])  # step 70 never arrived
        w1.metrics(x.id, a.attempt, 2, [50], scope=pb.EPOCH, names=("val_top1",), epoch=0)
        await w1.expect("batch_ack")
        w1.state(x.id, a.attempt, pb.QUEUED, "worker stopping")  # hand-back: no restart counted
        await srv.until(lambda: not srv.dispatcher.leases, what="hand-back")
        w2 = await srv.worker("w2")
        a2 = await w2.expect("assignment")
        assert (a2.attempt, a2.delivered_steps, a2.delivered_epochs) == (2, 70, 1)
        assert (await srv.db(srv.store.get_experiment, x.id)).restarts == 0


# ---------------------------------------------------------------- trust (forged messages)


@in_loop
async def test_forged_messages_from_another_session_are_refused(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="trainctl.server.workers_service")
    async with running_server(tmp_path, lease_timeout=1.5) as srv:
        x, owner, a = await _assigned(srv, "owner")
        owner.state(x.id, a.attempt, pb.RUNNING)
        owner.metrics(x.id, a.attempt, 1, [0, 1, 2], value=2.0)
        await owner.expect("batch_ack")
        await srv.db(srv.store.add_control, ControlRecord("cmd", x.id, "SET_LR", 0.01))

        # Another worker token holder, on its own stream, names the owner's run.
        thief = await srv.worker("thief")
        for _ in range(3):
            thief.metrics(x.id, a.attempt, 7, [0], value=666.0)  # overwrite step 0
        thief.send(ack=pb.ControlAck(experiment_id=x.id, attempt=a.attempt, command_id="cmd", ok=True,
                                     applied_step=12345, old_value=1.0, new_value=0.01))
        thief.state(x.id, a.attempt, pb.FAILED, "forged")
        thief.state(x.id, a.attempt, pb.QUEUED, "forged hand-back")
        stop = await thief.expect("cancel")
        assert (stop.experiment_id, stop.kind) == (x.id, pb.STOP_FENCED)

        await asyncio.sleep(0.3)
        assert _loss(srv.store, x.id) == {0: 2.0, 1: 2.0, 2: 2.0}
        assert (await srv.db(srv.store.list_controls, x.id))[0].status == "PENDING"
        y = await srv.db(srv.store.get_experiment, x.id)
        assert (y.state, y.attempt, y.worker_id) == ("RUNNING", a.attempt, "owner")
        assert len(thief.of_kind("cancel")) == 1  # answered once, however many it sends
        refused = [r for r in caplog.records if "refused messages about experiment" in r.getMessage()]
        assert len(refused) == 1 and "thief" in refused[0].getMessage()

        # Heartbeats from the thief never keep the (now silent) owner's lease alive.
        for _ in range(15):
            thief.heartbeat(x.id, a.attempt)
            await asyncio.sleep(0.2)
            if not srv.dispatcher.leases:
                break
        await srv.until(lambda: srv.store.get_experiment(x.id).state == "QUEUED", what="requeue", timeout=5)
        assert (await owner.expect("cancel")).kind == pb.STOP_FENCED


@in_loop
async def test_an_ack_must_name_a_command_of_its_experiment(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, w, a = await _assigned(srv)
        other = await srv.db(srv.store.create_experiment, "other", SPEC)
        for exp in (x.id, other.id):  # the same client-chosen id on two experiments: two commands
            await srv.db(srv.store.add_control, ControlRecord("same", exp, "SET_LR", 0.01))
        w.send(ack=pb.ControlAck(experiment_id=x.id, attempt=a.attempt, command_id="same", ok=True,
                                 applied_step=5, old_value=0.1, new_value=0.01))
        await srv.until(lambda: srv.store.list_controls(x.id)[0].status == "APPLIED", what="ack")
        assert (await srv.db(srv.store.list_controls, other.id))[0].status == "PENDING"
        # An ack naming a command the run does not have changes nothing.
        w.send(ack=pb.ControlAck(experiment_id=x.id, attempt=a.attempt, command_id="nope", ok=True))
        await asyncio.sleep(0.2)
        assert [c.command_id for c in await srv.db(srv.store.list_controls, x.id)] == ["same"]


@in_loop
async def test_the_session_keeps_the_latest_usage(tmp_path):
    async with running_server(tmp_path) as srv:
        w = await srv.worker("w1")
        w.heartbeat(usage=[pb.DeviceUsage(kind="cpu", utilization=150.0, memory_used_bytes=123)])
        w.heartbeat()  # a heartbeat without a sample keeps the last one
        w.heartbeat(usage=[pb.DeviceUsage(kind="cpu", utilization=90.0, memory_used_bytes=456)])
        w.heartbeat()
        await srv.until(lambda: [u.memory_used_bytes for u in srv.dispatcher.sessions["w1"].usage] == [456],
                        what="usage")


# ---------------------------------------------------------------- commands end, never PENDING forever


@in_loop
async def test_pending_commands_expire_at_run_end_and_are_published(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, w, a = await _assigned(srv)
        w.state(x.id, a.attempt, pb.RUNNING)
        w.metrics(x.id, a.attempt, 1, range(8))
        await w.expect("batch_ack")
        await srv.db(srv.store.add_control, ControlRecord("live", x.id, "SET_LR", 0.01))
        sub = srv.live.hub.subscribe(x.id)
        waiter = srv.live.expect_control(x.id, "live")  # a Control call waiting for its ack
        w.state(x.id, a.attempt, pb.COMPLETED)
        rec = await srv.live.wait_control(x.id, "live", waiter, 5)
        assert (rec.status, rec.message) == ("EXPIRED", "the run ended COMPLETED at step 7 before it applied")
        events = []
        while not sub.queue.empty():
            events.append(sub.queue.get_nowait())
        kinds = [ev.WhichOneof("event") for ev in events]
        assert kinds[-2:] == ["control", "experiment"]  # before the final state, which ends a Watch
        controls = [ev.control for ev in events if ev.WhichOneof("event") == "control"]
        assert [(c.command_id, c.status) for c in controls] == [("live", pb.EXPIRED)]
        assert not controls[0].HasField("at_step")  # LIVE: unset on the wire


@in_loop
async def test_cancel_is_idempotent_and_sends_a_typed_stop(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, w, a = await _assigned(srv)
        first = await srv.experiments.Cancel(pb.CancelRequest(id=x.id, reason="enough"))
        again = await srv.experiments.Cancel(pb.CancelRequest(id=x.id))
        assert first.state == again.state == pb.CANCELLED and again.message == "enough"
        stop = await w.expect("cancel")
        assert (stop.kind, stop.reason) == (pb.STOP_CANCELLED, "enough")
        done = await srv.db(srv.store.create_experiment, "done", SPEC)
        await srv.db(srv.store.transition, *(await _complete(srv, done.id)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.experiments.Cancel(pb.CancelRequest(id=done.id))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@in_loop
async def test_rows_a_run_trained_before_it_saw_the_cancel_are_kept(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        x, w, a = await _assigned(srv)
        w.state(x.id, a.attempt, pb.RUNNING)
        w.metrics(x.id, a.attempt, 1, range(3))
        await srv.until(lambda: srv.store.count_metrics(x.id) == 3, what="3 points")
        await srv.experiments.Cancel(pb.CancelRequest(id=x.id))
        await w.expect("cancel")
        # In flight when the stop went out: still the run's own work, so it is stored.
        w.metrics(x.id, a.attempt, 2, range(3, 6))
        w.state(x.id, a.attempt, pb.CANCELLED)
        await srv.until(lambda: srv.store.count_metrics(x.id) == 6, what="6 points")
        await srv.until(lambda: x.id not in srv.dispatcher.leases, what="lease released")
        assert srv.store.get_experiment(x.id).state == "CANCELLED"


async def _complete(srv, exp_id):
    claimed = await srv.db(srv.store.claim_next, "direct", 0)
    assert claimed.id == exp_id
    return exp_id, claimed.attempt, "COMPLETED"


# ---------------------------------------------------------------- store outages and stalls


def _lock(db_path) -> sqlite3.Connection:
    """Another connection holding SQLite's write lock (what a stuck process does)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


@in_loop
async def test_store_outage_at_lease_expiry_keeps_the_lease_and_requeues_later(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="trainctl.server.dispatcher")
    monkeypatch.setattr(dialects, "SQLITE_BUSY_TIMEOUT_MS", 100)  # fail fast instead of waiting 30 s
    async with running_server(tmp_path, lease_timeout=0.8) as srv:
        x, w, a = await _assigned(srv)
        w.state(x.id, a.attempt, pb.RUNNING)
        await srv.until(lambda: srv.store.get_experiment(x.id).state == "RUNNING", what="RUNNING")
        lock = _lock(tmp_path / "trainctl.db")
        try:
            # The worker is gone; its lease expires, the requeue cannot be written.
            await asyncio.sleep(2.5)  # past the lease, then several passes, each retrying the requeue
            assert srv.live.health.failed
            assert x.id in srv.dispatcher.leases  # kept: never dropped before the requeue is stored
            assert (await srv.db(srv.store.get_experiment, x.id)).state == "RUNNING"
            assert not w.of_kind("cancel")
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        await srv.until(lambda: srv.store.get_experiment(x.id).state == "QUEUED", what="requeue", timeout=5)
        assert (await w.expect("cancel")).kind == pb.STOP_FENCED
        assert x.id not in srv.dispatcher.leases or srv.dispatcher.leases[x.id].attempt == 2
        down = [r for r in caplog.records if "store unavailable" in r.getMessage()]
        assert len(down) == 1  # once per outage, not once per pass
        assert "database is locked" in down[0].getMessage() and "sqlite3" not in down[0].getMessage()


@in_loop
async def test_a_metric_write_stuck_on_a_db_lock_does_not_expire_the_lease(tmp_path, monkeypatch):
    """The worker keeps heartbeating, but its stream is read in order and a metric
    write waits on a lock held past the lease: lease time must stop meanwhile."""
    monkeypatch.setattr(dialects, "SQLITE_BUSY_TIMEOUT_MS", 20_000)
    async with running_server(tmp_path, lease_timeout=2.0) as srv:
        x, w, a = await _assigned(srv)
        w.state(x.id, a.attempt, pb.RUNNING)
        await srv.until(lambda: srv.store.get_experiment(x.id).state == "RUNNING", what="RUNNING")
        lock = _lock(tmp_path / "trainctl.db")
        try:
            w.metrics(x.id, a.attempt, 1, range(5))
            for _ in range(20):  # 4 s of heartbeats, twice the lease
                w.heartbeat(x.id, a.attempt)
                await asyncio.sleep(0.2)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        await w.expect("batch_ack")
        for _ in range(5):
            w.heartbeat(x.id, a.attempt)
            await asyncio.sleep(0.2)
        y = await srv.db(srv.store.get_experiment, x.id)
        assert (y.state, y.restarts, y.attempt) == ("RUNNING", 0, a.attempt)
        assert not w.of_kind("cancel")
        assert sorted(_loss(srv.store, x.id)) == list(range(5))


@in_loop
async def test_a_stalled_server_does_not_expire_leases(tmp_path):
    """The server's loop stops for longer than the lease (what SIGSTOP or a stuck
    process looks like from inside): the time it was not running is not lease time."""
    async with running_server(tmp_path, lease_timeout=2.0) as srv:
        x, w, a = await _assigned(srv)
        w.state(x.id, a.attempt, pb.RUNNING)
        beats = asyncio.create_task(_beat(w, x.id, a.attempt))
        await asyncio.sleep(0.5)
        time.sleep(4.0)  # the whole server stalls, twice the lease
        await asyncio.sleep(1.0)
        beats.cancel()
        y = await srv.db(srv.store.get_experiment, x.id)
        assert (y.state, y.restarts) == ("RUNNING", 0)
        assert not w.of_kind("cancel")


async def _beat(w, exp_id, attempt):
    while True:
        w.heartbeat(exp_id, attempt)
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------- the lease clock, by arithmetic


class _Time:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_lease_clock_counts_only_healthy_capped_ticks():
    t = _Time()
    healthy = [True]
    clock = LeaseClock(lambda: healthy[0], max_step=1.0, now=t)
    for _ in range(4):
        t.t += 0.5
        clock.tick()
    assert clock.now() == pytest.approx(2.0)
    t.t += 0.25
    assert clock.now() == pytest.approx(2.25)  # between ticks: what the next one would add
    t.t += 19.75  # the process was stopped: one tick, capped
    assert clock.tick() == pytest.approx(3.0)
    healthy[0] = False  # the database is stalled: no lease time at all
    for _ in range(10):
        t.t += 0.5
        clock.tick()
    assert clock.now() == pytest.approx(3.0)
    healthy[0] = True
    t.t += 0.5
    assert clock.tick() == pytest.approx(3.5)


def test_db_health_stall_and_failure():
    t = _Time()
    h = DbHealth(1.0, now=t)
    with h.call():
        t.t += 0.9
        assert h.healthy()
        t.t += 0.2
        assert not h.healthy() and h.stalled_for() == pytest.approx(1.1)
    assert h.healthy()
    with pytest.raises(StoreUnavailable):
        with h.call():
            raise StoreUnavailable("requeue", OSError("database or disk is full"))
    assert h.failed and not h.healthy()
    with h.call():
        pass
    assert h.healthy()
