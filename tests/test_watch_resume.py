"""`Client.watch` survives streams that break (issue 10 item 13): it reopens from the
last row seen, yields every row once, ends only on a final state (or raises), and
`wait()` never returns a state that is not final.

Fast: an in-process gRPC server whose Watch cuts every stream after a few events, in
every way a stream can end early (CANCELLED, UNAVAILABLE, RESOURCE_EXHAUSTED, a quiet
end). Slow: the real server process is killed and restarted mid-watch.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from concurrent import futures

import grpc
import pytest

from tests.conftest import Cluster, digits_spec, wait_healthy
from trainctl.client.resume import WatchCursor
from trainctl.client.sdk import Client, ControlResult, Event, ExperimentInfo, TrainctlError, WaitTimeout
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

STEPS, SPE = 40, 10  # 4 epochs of 10 steps; epoch rows at steps 10, 20, 30, 40


class ScriptedRun(pb_grpc.ExperimentsServicer):
    """One experiment, already final: Watch sends the state, the stored rows (step >=
    from_step), the control log, the final state, and cuts each stream after `cut`
    events in the way `how` names (cycling)."""

    def __init__(self, cut: int, hows=("CANCELLED", "UNAVAILABLE", "quiet", "RESOURCE_EXHAUSTED"),
                 final: bool = True):
        self.cut, self.hows, self.final = cut, hows, final
        self.calls: list[int] = []

    def experiment(self, state=None) -> pb.Experiment:
        return pb.Experiment(id=1, name="s", state=state or (pb.COMPLETED if self.final else pb.RUNNING),
                             attempt=1, last_step=STEPS)

    def events(self, from_step: int):
        yield pb.WatchEvent(experiment=self.experiment(pb.RUNNING))
        for step in range(from_step, STEPS + 1):
            if step < STEPS:
                b = pb.MetricBatch(experiment_id=1, scope=pb.STEP, names=["loss"])
                b.rows.add(step=step, epoch=step // SPE, wall_time=1000.0 + step, values=[1.0 / (step + 1)])
                yield pb.WatchEvent(metrics=b)
            if step and step % SPE == 0:
                b = pb.MetricBatch(experiment_id=1, scope=pb.EPOCH, names=["val_top1"])
                b.rows.add(step=step, epoch=step // SPE - 1, wall_time=1000.5 + step, values=[step / 100])
                yield pb.WatchEvent(metrics=b)
        rec = pb.ControlRecord(command_id="c1", experiment_id=1, kind=pb.SET_LR, value=0.1, status=pb.APPLIED,
                               source=pb.LIVE, applied_step=7, old_value=0.2, new_value=0.1)
        yield pb.WatchEvent(control=rec)
        if self.final:
            yield pb.WatchEvent(experiment=self.experiment())

    def Watch(self, request, context):
        n = len(self.calls)
        self.calls.append(request.from_step)
        how = self.hows[n % len(self.hows)]
        for i, ev in enumerate(self.events(request.from_step)):
            if i == self.cut:
                if how == "quiet":
                    return
                context.abort(getattr(grpc.StatusCode, how), f"cut by the test ({how})")
            yield ev
        if not self.final:
            while context.is_active():  # a live stream that never ends on its own
                time.sleep(0.05)

    def Get(self, request, context):
        return self.experiment()


@pytest.fixture
def scripted():
    servers = []

    def start(run: ScriptedRun) -> Client:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_ExperimentsServicer_to_server(run, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return Client(f"127.0.0.1:{port}")

    yield start
    for s in servers:
        s.stop(0)


def _check_complete(events: list[Event]) -> None:
    steps = [e.step for e in events if e.kind == "step"]
    epochs = [e.epoch for e in events if e.kind == "epoch"]
    assert steps == list(range(STEPS)), steps           # every step once, in order
    assert epochs == [0, 1, 2, 3], epochs
    assert [e.control.command_id for e in events if e.kind == "control"] == ["c1"]
    states = [e.experiment.state for e in events if e.kind == "experiment"]
    assert states[-1] == "COMPLETED" and states.count("COMPLETED") == 1
    assert [e.wall_time for e in events if e.kind == "step"] == [1000.0 + s for s in range(STEPS)]


@pytest.mark.parametrize("cut", [4, 7, 12])
def test_watch_resumes_after_every_kind_of_cut(scripted, cut):
    run = ScriptedRun(cut)
    with scripted(run) as c:
        events = list(c.watch(1, retries=3))
    _check_complete(events)
    assert len(run.calls) > 3 and run.calls[0] == 0
    assert run.calls == sorted(run.calls)  # each reopening starts at or after the last


def test_watch_from_step_is_kept_across_reconnects(scripted):
    run = ScriptedRun(5)
    with scripted(run) as c:
        steps = [e.step for e in c.watch(1, from_step=25, retries=3) if e.kind == "step"]
    assert steps == list(range(25, STEPS)) and min(run.calls) == 25


def test_watch_that_never_progresses_raises_after_bounded_retries(scripted):
    run = ScriptedRun(1, hows=("UNAVAILABLE",))  # only the first state event gets through
    with scripted(run) as c:
        t0 = time.monotonic()
        with pytest.raises(TrainctlError) as err:
            list(c.watch(1, retries=2))
    assert err.value.code == "UNAVAILABLE" and len(run.calls) == 3 and time.monotonic() - t0 < 10


def test_wait_returns_only_a_final_state(scripted):
    with scripted(ScriptedRun(4)) as c:
        assert c.wait(1, timeout=30).state == "COMPLETED"
    with scripted(ScriptedRun(10_000, final=False)) as c:
        with pytest.raises(WaitTimeout) as err:
            c.wait(1, timeout=1.0)
        assert isinstance(err.value, TimeoutError) and err.value.code == "DEADLINE_EXCEEDED"


def test_cursor_drops_what_it_already_yielded():
    cur = WatchCursor(from_step=0)
    x = ExperimentInfo(id=1, name="", state="RUNNING", spec={}, attempt=1, worker_id="", message="", summary={},
                       last_step=0, created_at=None, started_at=None, finished_at=None, replay_of=0)
    rec = ControlResult("c", 1, "SET_LR", 0.1, "APPLIED", "LIVE", 3, 0.2, 0.1, "", None, None, None)
    first = [Event("experiment", experiment=x), Event("step", step=0), Event("step", step=1),
             Event("epoch", step=2, epoch=0), Event("control", control=rec)]
    assert list(cur.accept(first)) == first
    assert cur.next_from_step == 2  # at the epoch row past the last step row (live order)
    again = [Event("experiment", experiment=x), Event("step", step=1), Event("epoch", step=2, epoch=0),
             Event("step", step=2), Event("control", control=rec)]
    assert [(e.kind, e.step) for e in cur.accept(again)] == [("step", 2)]
    assert not cur.final


# ---------------------------------------------------------------------- real processes
@pytest.mark.slow
def test_watch_survives_a_server_restart(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.add_worker("w0")
        with c.client() as cl:
            x = cl.submit(digits_spec("restart", epochs=3, max_steps=8))
            seen: list[Event] = []
            errors: list[BaseException] = []

            def watch():
                try:
                    with Client(c.address) as wc:
                        seen.extend(wc.watch(x.id, retries=12))
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    errors.append(exc)

            t = threading.Thread(target=watch, daemon=True)
            t.start()
            deadline = time.monotonic() + 240
            while not any(e.kind == "step" and e.step >= 2 for e in seen):
                assert time.monotonic() < deadline and t.is_alive(), (errors, c.logs())
                time.sleep(0.1)
            c.server.stop(signal.SIGKILL)  # every stream breaks at once
            time.sleep(1.0)
            c.start_server()               # same port, same database
            wait_healthy(c.address, c.server)
            t.join(300)
            assert not t.is_alive() and not errors, (errors, c.logs())
            final = cl.get(x.id)
        assert final.state == "COMPLETED", c.logs()
        steps = [e.step for e in seen if e.kind == "step"]
        assert sorted(steps) == list(range(final.summary["steps"])) and len(steps) == len(set(steps)), steps
        assert [e.epoch for e in seen if e.kind == "epoch"] == [0, 1, 2]
        assert [e.experiment.state for e in seen if e.kind == "experiment"][-1] == "COMPLETED"
        assert not any(math.isnan(e.wall_time) for e in seen if e.kind == "step")
    finally:
        c.stop()
