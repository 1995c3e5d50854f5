"""Runs train in their own process (workers/runner.py, the agent side, and
workers/run_process.py): the typed pipe protocol (workers/pipe.py) between the
run process and the agent, and what happens when either side dies. Real processes,
a real pipe; the agent-side tests use a real server and worker."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from tests.conftest import RESNET10T, Cluster, digits_spec
from trainctl.workers import pipe, run_process, runner
from trainctl.workers.engine.context import Ack, Command


def _child_logs_rows(conn, n: int, gap_s: float) -> None:
    sink = run_process.BatchingSink(conn.send)
    for step in range(n):
        sink.log("STEP", step, 0, {"loss": float(step)})
        time.sleep(gap_s)
    sink.log("EPOCH", n, 0, {"val_top1": 0.5})
    conn.send(pipe.Done("completed", {}))


def test_batching_sink_batches_rows_and_sends_epoch_rows_at_once():
    mp = multiprocessing.get_context("spawn")
    here, there = mp.Pipe()
    p = mp.Process(target=_child_logs_rows, args=(there, 60, 0.002))
    p.start()
    batches = []
    while True:
        msg = here.recv()
        if isinstance(msg, pipe.Done):
            break
        assert isinstance(msg, pipe.Rows), msg
        batches.append(msg.rows)
    p.join()
    rows = [r for b in batches for r in b]
    assert [(r[0], r[1]) for r in rows] == [("STEP", s) for s in range(60)] + [("EPOCH", 60)]
    # ~2 ms a row and a 20 ms linger: rows travel in batches, not one message each.
    assert len(batches) < 30, [len(b) for b in batches]
    assert batches[-1][-1][0] == "EPOCH"
    assert all(isinstance(r[3], float) and abs(r[3] - time.time()) < 60 for r in rows)  # wall times kept


def test_pipe_inbox_reads_controls_and_cancel_at_step_boundaries():
    here, there = multiprocessing.Pipe()
    inbox = run_process.PipeInbox(there, scheduled=[Command("s", "set_lr", 0.5, at_step=3)])
    here.send(pipe.Control(Command("live", "scale_lr", 0.1)))
    here.send(pipe.Ping())
    assert [c.command_id for c in inbox.due(0)] == ["live"]
    assert [c.command_id for c in inbox.due(3)] == ["s"]
    assert not inbox.cancelled
    here.send(pipe.Cancel("user asked"))
    assert inbox.cancelled and inbox.cancel_reason == "user asked"


def test_pipe_inbox_cancels_when_the_agent_is_gone():
    here, there = multiprocessing.Pipe()
    inbox = run_process.PipeInbox(there)
    here.close()
    assert inbox.cancelled and "agent went away" in inbox.cancel_reason


def test_forwarding_inbox_keeps_commands_until_attached_then_forwards():
    sent = []
    inbox = runner.ForwardingInbox(scheduled=[Command("s", "set_lr", 0.5, at_step=3)])
    inbox.put(Command("early", "set_lr", 0.2))
    waiting = inbox.attach(sent.append)
    assert [c.command_id for c in waiting] == ["s", "early"]
    inbox.put(Command("late", "set_lr", 0.3))
    assert sent == [pipe.Control(Command("late", "set_lr", 0.3))]
    inbox.ack(Ack("late", True, 5))
    assert inbox.acks == [Ack("late", True, 5)]


def test_exit_text_names_the_signal():
    assert "SIGKILL" in runner._exit_text(-9) and "out-of-memory" in runner._exit_text(-9)
    assert runner._exit_text(3) == "exit code 3"


# ---------------------------------------------------------------------- with real processes


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out


def _descendants(pid: int) -> list[int]:
    kids = _children(pid)
    return kids + [d for k in kids for d in _descendants(k)]


def _run_process(worker_pid: int, timeout: float = 60) -> int:
    """The pid of the worker's run process: the forkserver's child that trains."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _descendants(worker_pid):
            try:
                with open(f"/proc/{pid}/cmdline") as fh:
                    cmd = fh.read()
            except FileNotFoundError:
                continue
            if "forkserver" in cmd and pid not in _children(worker_pid):
                return pid  # a fork of the forkserver, not the forkserver itself
        time.sleep(0.1)
    raise TimeoutError("no run process found")


def _wait_step(c, exp_id: int, step: int) -> None:
    for ev in c.watch(exp_id, live_only=True):
        if ev.kind == "step" and ev.step >= step:
            return
    raise AssertionError(f"experiment {exp_id} ended before step {step}")


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """One server and one worker w0 for the agent-side tests below, in file order: the run
    process killed and the agent frozen (w0 lives on through both), then the agent
    killed (last: w0 is gone after it). Each waits for its run to end, so the next one's
    run is the only one on w0. Saves a server start and a worker's torch import per test."""
    c = Cluster(tmp_path_factory.mktemp("runner"))
    c.add_worker("w0")
    yield c
    c.stop()


def _training(cluster, spec: dict):
    """w0 training `spec` past step 3: (client, worker, experiment id, run process pid)."""
    (w,) = cluster.workers
    c = cluster.client()
    x = c.submit(spec)
    _wait_step(c, x.id, 3)
    return c, w, x.id, _run_process(w.popen.pid)


@pytest.mark.slow
def test_a_run_process_killed_fails_its_run_and_the_worker_goes_on(box):
    c, _, exp_id, run_pid = _training(box, digits_spec("doomed", epochs=50))
    with c:
        os.kill(run_pid, signal.SIGKILL)
        final = c.wait(exp_id, timeout=60)
        assert final.state == "FAILED", box.logs()
        assert final.message == ("the training process died: killed by SIGKILL (the kernel's out-of-memory "
                                 "killer sends this)"), final.message
        y = c.submit(digits_spec("next", epochs=1, max_steps=2))
        assert c.wait(y.id, timeout=120).state == "COMPLETED", box.logs()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


@pytest.mark.slow
def test_a_run_process_pauses_while_its_agent_is_frozen(box):
    c, w, exp_id, run_pid = _training(box, digits_spec("paused", epochs=2, max_steps=20,
                                                          model=RESNET10T))  # trains on through the freeze
    with c:
        w.popen.send_signal(signal.SIGSTOP)  # the agent only: its run process keeps running
        try:
            time.sleep(pipe.AGENT_SILENCE_S + 1.5)
            before = _cpu_ticks(run_pid)
            time.sleep(1.5)
            assert _cpu_ticks(run_pid) - before <= 5, "the run process trained on while its agent was frozen"
        finally:
            w.popen.send_signal(signal.SIGCONT)
        assert c.wait(exp_id, timeout=120).state == "COMPLETED", box.logs()
        steps = [ev.step for ev in c.watch(exp_id) if ev.kind == "step"]
        assert steps == list(range(40))


@pytest.mark.slow
def test_a_killed_agent_does_not_leave_its_run_training(box):
    c, w, _, run_pid = _training(box, digits_spec("orphan", epochs=50))
    with c:
        w.stop(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(run_pid):
            time.sleep(0.1)
        assert not _alive(run_pid), "the run process trained on after its agent was killed"


@pytest.mark.slow
def test_a_fenced_run_process_is_killed_at_once_and_delivers_nothing_more(tmp_path):
    """STOP_FENCED (issue 10 item 3): no further step, no checkpoint write, no row after."""
    import threading

    from trainctl.spec import parse_spec
    from trainctl.workers.engine.context import Cancelled, Lineage, TrainingContext

    spec = parse_spec(digits_spec("fenced", epochs=500, max_steps=2), check_model=False)
    inbox = runner.ForwardingInbox()
    rows, fenced_at = [], {}
    ctx = TrainingContext(inbox=inbox, checkpoint_dir=str(tmp_path), lineage=Lineage("s", 1, 1))
    outcome = {}

    def on_rows(batch):
        assert "t" not in fenced_at, "rows delivered after the fence"
        rows.extend(batch)

    def run():
        try:
            runner.run_in_process(spec, ctx, on_rows)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome["exc"] = exc

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 300
    while not any(r[0] == "EPOCH" and r[2] >= 1 for r in rows):   # a few checkpoints written
        assert time.monotonic() < deadline and t.is_alive(), outcome
        time.sleep(0.05)
    kill = inbox.kill
    assert kill is not None
    on_disk = sorted(p.name for p in tmp_path.glob("ckpt-*.pt"))
    inbox.fence("attempt 1 fenced")
    fenced_at["t"] = time.monotonic()
    t.join(30)
    assert not t.is_alive()
    assert isinstance(outcome.get("exc"), Cancelled) and str(outcome["exc"]) == "attempt 1 fenced"
    time.sleep(1.0)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == on_disk   # no checkpoint after the fence
    assert inbox.kill is None


def test_the_agent_never_imports_torch():
    # It imports the checkpoint module's file half (lineage paths, pruning): that half
    # must stay torch-free, or every worker start pays the import before connecting.
    import subprocess
    import sys

    code = ("import sys; import trainctl.workers.agent, trainctl.workers.engine.checkpoint;"
            " assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
