"""A short write (a control command, its ack) never waits behind a whole large metric
batch: the store's first-come write lock, a batch committed in parts while another
write waits, the Workers stream handling an ack while a batch is being written, and
metric writes stepping aside (within bounds) while a client waits on a command.
In-process, real SQLite file (and PostgreSQL for the store's stepping aside), real
gRPC loopback; seconds."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from trainctl.server.store import ControlRecord
from trainctl.server.store.metrics import WRITE_PART
from trainctl.server.store.sqlalchemy_store import SqlAlchemyStore
from trainctl.server.store.writelock import FairLock, Urgency
from trainctl.v1 import trainctl_pb2 as pb

from tests.conftest import wait_for
from tests.scripted import in_loop, running_server

pytest_plugins = ["tests.pg"]  # pg_url: a throwaway PostgreSQL database (skips, saying why, without one)

NAMES = ("a", "b", "c", "d")
STEPS = 25_000  # 100,000 points: a few hundred ms of SQLite work, ~100 parts


def _rows(steps):
    return [(s, 0, 1.0, [float(s % 97), 1.0, 2.0, 3.0]) for s in steps]


def test_fair_lock_serves_waiters_in_arrival_order():
    lock = FairLock()
    order: list[str] = []
    lock.acquire()
    assert not lock.waiting()

    def take(name):
        with lock:
            order.append(name)

    threads = []
    for name in "bcd":
        t = threading.Thread(target=take, args=(name,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5
        while len(lock._waiters) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.001)  # each queues before the next starts
    assert lock.waiting()
    order.append("a")
    # The holder lets go and asks again at once: the waiters are served first.
    lock.release()
    take("a again")
    for t in threads:
        t.join(5)
    assert order == ["a", "b", "c", "d", "a again"]
    assert not lock.waiting() and not lock._held


def _step_aside_in_thread(u: Urgency) -> tuple[threading.Thread, list]:
    ended: list[float] = []
    t = threading.Thread(target=lambda: (u.step_aside(), ended.append(time.monotonic())))
    t.start()
    return t, ended


def test_rows_step_aside_until_the_urgent_call_ends():
    u = Urgency(hold_s=30, budget_s=30)
    assert not u.active()
    u.step_aside()  # nothing urgent: returns at once
    assert u.waits == 0
    with u.hold():
        assert u.active()
        t, ended = _step_aside_in_thread(u)
        wait_for(lambda: u.aside == 1, timeout=10, every=0.002)
        time.sleep(0.1)
        assert t.is_alive() and u.aside == 1
        closed = time.monotonic()
    t.join(5)
    assert not t.is_alive() and closed <= ended[0] < closed + 2
    assert u.waits == 1 and u.aside == 0 and not u.active()


def test_an_urgent_call_holds_rows_for_hold_s_at_most():
    u = Urgency(hold_s=0.3, budget_s=30)
    with u.hold():
        t0 = time.monotonic()
        t, ended = _step_aside_in_thread(u)
        t.join(10)
        assert 0.2 <= ended[0] - t0 < 5  # the hold stopped counting; the call is still open
        assert not u.active()
        u.step_aside()  # an expired hold holds nothing
    assert u.waits == 1


def test_rows_step_aside_within_a_budget_whatever_the_commands():
    """A client sending commands back to back slows ingestion by a share, never stops it."""
    u = Urgency(hold_s=30, budget_s=0.3, window_s=60)
    with u.hold():
        t0 = time.monotonic()
        u.step_aside()
        t1 = time.monotonic()
        u.step_aside()  # the window's budget is spent
        t2 = time.monotonic()
    assert 0.2 <= t1 - t0 < 5 and t2 - t1 < 1
    assert u.waits == 1


def test_only_a_short_write_waiting_asks_a_bulk_one_to_commit_its_part():
    lock = FairLock()
    lock.acquire(bulk=True)
    threads = [threading.Thread(target=lambda b=b: (lock.acquire(bulk=b), lock.release())) for b in (True, False)]
    threads[0].start()
    wait_for(lambda: len(lock._waiters) == 1, timeout=10, every=0.002)
    assert not lock.waiting()  # another metric batch: no reason to cut this one
    threads[1].start()
    wait_for(lambda: len(lock._waiters) == 2, timeout=10, every=0.002)
    assert lock.waiting()
    lock.release()
    for t in threads:
        t.join(5)
    assert not lock.waiting() and not lock._held


@pytest.fixture
def store(tmp_path):
    s = SqlAlchemyStore(f"sqlite:///{tmp_path / 'trainctl.db'}")
    yield s
    s.close()


def test_a_waiting_write_goes_between_the_parts_of_a_long_metric_write(store):
    x = store.create_attached("run", {}, session_suffix="s", run_token_hash="h")
    done = threading.Event()
    big = threading.Thread(target=lambda: (store.add_metrics(x.id, 1, "STEP", NAMES, _rows(range(STEPS))),
                                           done.set()))
    big.start()
    deadline = time.monotonic() + 10
    while not store._write_lock._held and time.monotonic() < deadline:
        time.sleep(0.0005)
    store.add_control(ControlRecord("cmd", x.id, "SET_LR", 0.01))  # waits for one part at most
    stored_then = store.count_metrics(x.id)
    assert not done.is_set(), "the control write waited for the whole batch"
    big.join(30)
    assert done.is_set()
    # Committed in parts, but nothing lost and the rollup agrees with the raw points.
    assert WRITE_PART <= stored_then < 4 * STEPS
    assert store.count_metrics(x.id) == 4 * STEPS
    raw = {s.name: s for s in store.get_metrics(x.id)}
    assert raw["a"].steps == list(range(STEPS))
    down, total = store.get_metrics_downsampled(x.id, 500, names=["a"])
    assert total == STEPS and max(down[0].values) == 96.0 and min(down[0].values) == 0.0
    assert store.get_experiment(x.id).last_step == STEPS - 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_long_metric_write_steps_aside_between_parts_while_a_command_is_urgent(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'trainctl.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    store = SqlAlchemyStore(url)
    steps = STEPS if backend == "sqlite" else STEPS // 10  # PostgreSQL: ~0.5-1 s of writing
    try:
        x = store.create_attached("run", {}, session_suffix="s", run_token_hash="h")
        store._urgency = Urgency(hold_s=60, budget_s=60)  # held until the test lets go
        big = threading.Thread(target=store.add_metrics, args=(x.id, 1, "STEP", NAMES, _rows(range(steps))))
        big.start()
        if backend == "sqlite":
            wait_for(lambda: store._write_lock._held, timeout=10, every=0.002)  # the batch is being written
        else:  # (no in-process lock to watch: a part or none may be written when the hold opens)
            time.sleep(0.05)
        with store.urgent():
            wait_for(lambda: store._urgency.aside == 1, timeout=10, every=0.002)
            before = store.count_metrics(x.id)
            time.sleep(0.3)
            # Stepped aside after committing a part: nothing written while the command is urgent.
            assert store.count_metrics(x.id) == before and big.is_alive()
            assert (WRITE_PART if backend == "sqlite" else 0) <= before < 4 * steps
            store.add_control(ControlRecord("cmd", x.id, "SET_LR", 0.01))  # no write waits on the batch
        big.join(30)
        assert store.count_metrics(x.id) == 4 * steps
        assert store._urgency.waits == 1
        raw = {s.name: s for s in store.get_metrics(x.id)}
        assert raw["a"].steps == list(range(steps))  # the parts add up, the rollup too
        down, total = store.get_metrics_downsampled(x.id, 500, names=["a"])
        assert total == steps and max(down[0].values) == 96.0 and min(down[0].values) == 0.0
    finally:
        store.close()


def test_metric_batches_waiting_for_each_other_each_commit_whole(store):
    """Concurrent workers' batches queue; none is cut into parts for another (parts
    commit ~10x as often: ingestion from 4-16 workers fell to a third)."""
    x = store.create_attached("run", {}, session_suffix="s", run_token_hash="h")
    batches = [_rows(range(k * STEPS, (k + 1) * STEPS)) for k in range(2)]
    threads = [threading.Thread(target=store.add_metrics, args=(x.id, 1, "STEP", NAMES, b)) for b in batches]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        seen.add(store.count_metrics(x.id))
        time.sleep(0.005)
    for t in threads:
        t.join()
    assert seen <= {0, 4 * STEPS, 8 * STEPS}, sorted(seen)
    assert store.count_metrics(x.id) == 8 * STEPS


def test_an_uncontended_metric_write_is_one_transaction(store):
    """Parts commit only when someone waits: alone, a batch is all or nothing (a
    refused batch stores none of its rows)."""
    x = store.create_attached("run", {}, session_suffix="s", run_token_hash="h")
    store.add_metrics(x.id, 1, "STEP", NAMES, _rows(range(10)))
    from trainctl.server.store.errors import StaleAttempt
    with pytest.raises(StaleAttempt):
        store.add_metrics(x.id, 2, "STEP", NAMES, _rows(range(10, STEPS)))
    assert store.count_metrics(x.id) == 40


async def _running(srv):
    """A spec experiment RUNNING on scripted worker w1: (experiment, worker, assignment)."""
    x = await srv.db(srv.store.create_experiment, "x", {"name": "x"})
    srv.dispatcher.kick()
    w = await srv.worker("w1")
    a = await w.expect("assignment")
    w.state(x.id, a.attempt, pb.RUNNING)
    await srv.until(lambda: srv.store.get_experiment(x.id).state == "RUNNING", what="RUNNING")
    return x, w, a


@in_loop
async def test_a_control_ack_is_handled_while_a_large_batch_is_being_written(tmp_path):
    async with running_server(tmp_path, lease_timeout=30.0) as srv:
        x, w, a = await _running(srv)
        await srv.db(srv.store.add_control, ControlRecord("cmd", x.id, "SET_LR", 0.01))
        waiter = srv.live.expect_control(x.id, "cmd")
        w.metrics(x.id, a.attempt, 1, range(STEPS), names=NAMES)
        w.send(ack=pb.ControlAck(experiment_id=x.id, attempt=a.attempt, command_id="cmd", ok=True,
                                 applied_step=7, old_value=0.1, new_value=0.01))
        rec = await srv.live.wait_control(x.id, "cmd", waiter, 20)
        stored_then = srv.store.count_metrics(x.id)  # (a read: WAL lets it run beside the writer)
        assert rec.status == "APPLIED" and rec.applied_step == 7
        assert stored_then < 4 * STEPS, "the ack waited for the whole batch before it"
        ack = await w.expect("batch_ack", timeout=30)
        assert ack.seq == 1
        assert await srv.db(srv.store.count_metrics, x.id) == 4 * STEPS


@in_loop
async def test_a_batch_waits_while_a_client_waits_on_a_command_then_is_stored_and_acked(tmp_path):
    async with running_server(tmp_path, lease_timeout=30.0) as srv:
        x, w, a = await _running(srv)
        srv.store._urgency = Urgency(hold_s=60, budget_s=60)  # the command holds rows until acked
        call = asyncio.ensure_future(srv.experiments.Control(pb.ControlRequest(
            experiment_id=x.id, kind=pb.SET_LR, value=0.01, command_id="cmd", wait_seconds=30)))
        cmd = await w.expect("control", timeout=10)
        w.metrics(x.id, a.attempt, 1, range(100), names=NAMES)
        await srv.until(lambda: srv.store._urgency.aside == 1, what="the batch stepping aside")
        await asyncio.sleep(0.2)
        assert await srv.db(srv.store.count_metrics, x.id) == 0 and srv.store._urgency.aside == 1
        w.send(ack=pb.ControlAck(experiment_id=x.id, attempt=a.attempt, command_id=cmd.command_id, ok=True,
                                 applied_step=3, old_value=0.1, new_value=0.01))
        rec = await call
        assert rec.status == pb.APPLIED and rec.applied_step == 3
        ack = await w.expect("batch_ack", timeout=10)
        assert ack.seq == 1 and await srv.db(srv.store.count_metrics, x.id) == 400
        assert srv.store._urgency.waits == 1


@in_loop
async def test_a_final_state_waits_for_the_batch_before_it_and_its_ack_comes_at_once(tmp_path):
    """States keep their stream order behind metrics (a COMPLETED run has all its rows),
    and the batch acks are not held back after a final state (an SDK's finish() waits
    for them)."""
    async with running_server(tmp_path, lease_timeout=30.0) as srv:
        x = await srv.db(srv.store.create_experiment, "x", {"name": "x"})
        srv.dispatcher.kick()
        w = await srv.worker("w1")
        a = await w.expect("assignment")
        srv.dispatcher.sessions["w1"].ACK_DELAY_S = 60.0  # acks of batches would wait a minute...
        w.state(x.id, a.attempt, pb.RUNNING)
        w.metrics(x.id, a.attempt, 1, range(STEPS), names=NAMES)
        w.state(x.id, a.attempt, pb.COMPLETED)
        x = await srv.until(lambda: (y := srv.store.get_experiment(x.id)).state == "COMPLETED" and y,
                            timeout=30, what="COMPLETED")
        assert srv.store.count_metrics(x.id) == 4 * STEPS  # every row before the state
        ack = await w.expect("batch_ack", timeout=5)  # ...but not after a final state
        assert ack.seq == 1 and ack.final
