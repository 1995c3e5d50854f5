"""The worker's log shipper (workers/logship.py): numbering, batching, the unacked
window, the memory bound with its marker, a reader that never waits on the network,
resend after a reconnect (stored once, over real gRPC to the real in-process server),
and, with real processes, a spec run's logging reaching `trainctl logs`."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import grpc
import pytest

from trainctl.outbox import Outbox
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.workers.logship import MAX_TEXT_BYTES, LogShipper

from tests.conftest import Cluster, digits_spec
from tests.scripted import in_loop, running_server


class FakeOutbox:
    """Records what the shipper sends; `gate` (when set) makes send wait, like a sender
    stuck behind a dead connection."""

    def __init__(self):
        self.sent: list[pb.LogBatch] = []
        self.gate: threading.Event | None = None

    def send(self, msg: pb.WorkerMessage, **_):
        if self.gate is not None:
            self.gate.wait()
        self.sent.append(msg.logs)

    def lines(self, attempt=None) -> list[pb.LogLine]:
        return [ln for b in self.sent for ln in b.lines if attempt is None or b.attempt == attempt]


def _until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_lines_are_numbered_per_attempt_batched_and_forgotten_when_acked():
    out = FakeOutbox()
    s = LogShipper(out, batch_lines=500)
    for i in range(3):
        s.add(7, 1, pb.STDOUT, f"a{i}\n")
    s.add(7, 2, pb.STDERR, "b0\r\n")
    _until(lambda: len(out.lines()) == 4, what="the first lines")
    assert sorted((ln.attempt, ln.index, ln.text) for ln in out.lines()) == \
        [(1, 1, "a0"), (1, 2, "a1"), (1, 3, "a2"), (2, 1, "b0")]
    assert all(b.experiment_id == 7 and all(ln.attempt == b.attempt for ln in b.lines) for b in out.sent)
    for i in range(3, 1203):
        s.add(7, 1, pb.STDOUT, f"a{i}")
    _until(lambda: len(out.lines(1)) == 1203, what="1,200 more lines")
    assert [ln.index for ln in out.lines(1)] == list(range(1, 1204))
    assert max(len(b.lines) for b in out.sent) <= 500
    assert s.held()[0] == 1204  # nothing acknowledged yet
    s.acked(7, 1, 1203)
    s.acked(7, 2, 1)
    assert s.held() == (0, 0)


def test_unacked_batches_are_windowed_and_flush_sends_the_rest():
    out = FakeOutbox()
    s = LogShipper(out, batch_lines=10, window=2)
    for i in range(100):
        s.add(1, 1, pb.STDOUT, f"l{i}")
    time.sleep(0.5)
    assert len(out.sent) == 2  # two batches wait for their ack; the rest stays here
    s.acked(1, 1, out.sent[0].lines[-1].index)  # room for one more batch
    _until(lambda: len(out.sent) == 3, what="the next batch")
    time.sleep(0.3)
    assert len(out.sent) == 3 and len(out.lines()) < 100
    s.flush(1, 1)  # before a final state: everything, whatever the window
    assert [ln.index for ln in out.lines()] == list(range(1, 101))


def test_memory_is_bounded_oldest_dropped_with_a_marker():
    out = FakeOutbox()
    s = LogShipper(out, max_lines=100, max_bytes=1 << 30, batch_lines=10, window=1)
    for i in range(1, 1001):
        s.add(1, 1, pb.STDOUT, f"l{i}")
    lines, _ = s.held()
    assert lines <= 100
    s.flush(1, 1)
    sent = out.lines()
    markers = [ln for ln in sent if ln.stream == pb.SYSTEM]
    assert len(markers) == 1 and "lines dropped on the worker" in markers[0].text
    dropped = int(markers[0].text.split()[1].replace(",", ""))
    assert dropped == s.dropped
    real = {ln.index for ln in sent if ln.stream != pb.SYSTEM}
    # Every line missing is counted as dropped (so is a line sent before the gap: it went
    # unacknowledged); the marker sits at the gap (the index of the last line dropped);
    # the newest lines are all kept.
    missing = set(range(1, 1001)) - real
    gap = markers[0].index
    assert len(missing) <= s.dropped <= len(missing) + len([i for i in real if i < gap])
    assert set(range(1001 - 90, 1001)) <= real and gap in missing and all(i > gap for i in real if i > 10)
    # The byte bound too: 16 KiB lines, 1 MB held at most.
    s2 = LogShipper(FakeOutbox(), max_lines=10**6, max_bytes=1 << 20)
    for _ in range(500):
        s2.add(1, 1, pb.STDOUT, "x" * 16000)
    assert s2.held()[1] <= 1 << 20 and s2.dropped > 400


def test_add_never_waits_for_a_stuck_sender():
    out = FakeOutbox()
    out.gate = threading.Event()  # the sender thread blocks inside outbox.send
    s = LogShipper(out, max_lines=1000)
    done = threading.Event()

    def reader():  # a child's pipe reader: 50,000 lines while nothing can be sent
        for i in range(50_000):
            s.add(1, 1, pb.STDOUT, f"line {i}")
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    try:
        assert done.wait(60), "add() blocked behind the stuck sender"
        assert s.held()[0] <= 1000
    finally:
        out.gate.set()


def test_long_lines_are_cut_and_forgotten_attempts_ignored():
    out = FakeOutbox()
    s = LogShipper(out)
    s.add(1, 1, pb.STDOUT, "ß" * 20_000)  # 40,000 bytes
    s.flush(1, 1)
    (line,) = out.lines()
    assert len(line.text.encode()) <= MAX_TEXT_BYTES and line.text.endswith("[... line cut: 40000 bytes in all]")
    s.add(1, 1, pb.STDOUT, "unsent")
    s.forget(1, 1)  # fenced: its lines dropped, later ones ignored
    assert s.add(1, 1, pb.STDOUT, "late") == 0
    s.flush(1, 1)
    assert len(out.lines()) == 1 and s.held() == (0, 0)


# ---------------------------------------------------------------- over real gRPC


class _Stream:
    """One Connect stream the way the agent opens it: `shipper.stream(outbox.stream(...))`,
    LogAcks fed back to the shipper. `lose_logs`: log batches vanish on the way (a
    stream that broke with them in flight); `ignore_acks`: their acks never come back."""

    def __init__(self, address, shipper, outbox, x_id, attempt, *, current=False, lose_logs=False,
                 ignore_acks=False):
        self.stop = threading.Event()
        self.received: list[pb.ServerMessage] = []
        self.channel = grpc.insecure_channel(address)
        hello = pb.Hello(worker_id="w1", hostname="t")
        if current:
            hello.current.CopyFrom(pb.Heartbeat(experiment_id=x_id, attempt=attempt))
        self.holds = current  # heartbeats name the run once it is this stream's

        def heartbeat():
            return pb.Heartbeat(experiment_id=x_id, attempt=attempt) if self.holds else pb.Heartbeat()

        requests = shipper.stream(outbox.stream(pb.WorkerMessage(hello=hello), heartbeat, 0.2, self.stop))
        if lose_logs:
            requests = (m for m in requests if m.WhichOneof("msg") != "logs")
        self.call = pb_grpc.WorkersStub(self.channel).Connect(requests)

        def read():
            try:
                for msg in self.call:
                    self.received.append(msg)
                    self.holds = self.holds or msg.WhichOneof("msg") == "assignment"
                    if msg.WhichOneof("msg") == "log_ack" and not ignore_acks:
                        a = msg.log_ack
                        shipper.acked(a.experiment_id, a.attempt, a.index)
            except grpc.RpcError:
                pass

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def kinds(self):
        return [m.WhichOneof("msg") for m in self.received]

    def close(self):
        self.stop.set()
        self.call.cancel()
        self.reader.join(5)
        self.channel.close()


@in_loop
async def test_unacked_lines_are_resent_after_a_reconnect_and_stored_once(tmp_path):
    async with running_server(tmp_path, lease_timeout=5.0) as srv:
        address = srv.channel._channel.target.decode()
        x = await srv.db(srv.store.create_experiment, "x", {"name": "x"})
        outbox = Outbox()
        shipper = LogShipper(outbox)
        # 1: the lines' batches are lost on the way: nothing stored, all still held.
        s1 = _Stream(address, shipper, outbox, x.id, 1, lose_logs=True)
        await srv.until(lambda: "assignment" in s1.kinds(), what="assignment")
        for i in range(1, 51):
            shipper.add(x.id, 1, pb.STDOUT, f"line {i}")
        await asyncio.sleep(0.5)  # sent (and lost)
        assert await srv.db(srv.store.count_logs, x.id) == 0 and shipper.unacked() == 50
        s1.close()
        await srv.until(lambda: "w1" not in srv.dispatcher.sessions, what="session gone")
        # 2: reconnected (re-adopting its run): the 50 go again, right after the hello;
        # stored, but their acks are lost.
        s2 = _Stream(address, shipper, outbox, x.id, 1, current=True, ignore_acks=True)
        await srv.until(lambda: s2.kinds().count("log_ack") >= 1, what="stored")
        assert await srv.db(srv.store.count_logs, x.id) == 50 and shipper.unacked() == 50
        s2.close()
        await srv.until(lambda: "w1" not in srv.dispatcher.sessions, what="session gone")
        # 3: resent once more: the store keeps one copy of each, and the ack frees them.
        s3 = _Stream(address, shipper, outbox, x.id, 1, current=True)
        await srv.until(lambda: shipper.held() == (0, 0), what="acked")
        lines = await srv.db(srv.store.read_logs, x.id)
        assert [ln.index for ln in lines] == list(range(1, 51)) and lines[-1].text == "line 50"
        s3.close()


# ---------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One server and one worker for the two real-process tests below (the second kills
    the server and starts it again on the same database; the worker lives through it)."""
    c = Cluster(tmp_path_factory.mktemp("logship"))
    c.add_worker("w0")
    yield c
    c.stop()


@pytest.mark.slow
def test_a_spec_runs_logging_reaches_trainctl_logs(cluster):
    c = cluster.client()
    x = c.submit(digits_spec("logged", epochs=2, max_steps=3))
    assert c.wait(x.id, timeout=300).state == "COMPLETED", cluster.logs()
    cli = [sys.executable, "-m", "trainctl.client.cli", "logs", str(x.id), "--server", cluster.address]
    out = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    texts = [ln["text"] for ln in lines if ln["stream"] == "LOGGING"]
    assert any("training 'logged'" in t for t in texts), texts
    assert [t for t in texts if "epoch" in t and "val_top1=" in t][:2] and any("run completed" in t for t in texts)
    assert [ln["index"] for ln in lines] == list(range(1, len(lines) + 1))
    assert {ln["attempt"] for ln in lines} == {1}
    text = subprocess.run([*cli, "--tail", "1"], capture_output=True, text=True, timeout=60)
    assert text.stdout.splitlines() == [texts[-1]]
    # Followed after the end: the same lines, then the command ends by itself.
    follow = subprocess.run([*cli, "-f", "--attempt", "1"], capture_output=True, text=True, timeout=60)
    assert follow.returncode == 0 and follow.stdout.splitlines() == [ln["text"] for ln in lines]


CHATTY = """
import sys, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
for i in range(n):
    print(i, flush=True)
    if i % 50 == 0:
        print(f"err {i}", file=sys.stderr, flush=True)
    time.sleep(1 / rate)
"""


@pytest.mark.slow
def test_a_commands_output_survives_a_server_kill_exactly_once(cluster, tmp_path):
    """stdout/stderr of a submitted command while the server is SIGKILLed and restarted
    on the same database: the worker resends what was not acknowledged, the store keeps
    one copy, a `Client.logs(follow=True)` reader reopens and misses nothing."""
    import signal

    code = tmp_path / "code"
    code.mkdir()
    (code / "chatty.py").write_text(CHATTY)
    c = cluster.client()
    n = 1500
    x = c.submit({"name": "chatty", "command": f"{sys.executable} chatty.py {n} 250", "max_restarts": 0},
                 code_dir=code)
    followed: list = []
    reader = threading.Thread(target=lambda: followed.extend(cluster.client().logs(x.id, follow=True, retries=60)),
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any(ln.text == "300" for ln in followed):  # it is printing
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.1)
    cluster.server.stop(signal.SIGKILL)
    time.sleep(2)  # the command prints on; the worker holds its lines
    cluster.start_server()
    assert c.wait(x.id, timeout=180).state == "COMPLETED", cluster.logs()
    reader.join(60)
    assert not reader.is_alive()
    stored = list(c.logs(x.id))
    for lines in (stored, followed):
        assert [int(ln.text) for ln in lines if ln.stream == "STDOUT"] == list(range(n))
        assert [ln.text for ln in lines if ln.stream == "STDERR"] == [f"err {i}" for i in range(0, n, 50)]
        assert [ln.index for ln in lines] == list(range(1, len(lines) + 1))  # numbered, each once
    assert not [ln for ln in stored if "dropped" in ln.text]
