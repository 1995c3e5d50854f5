"""A control ack leaves during `run.step()`, not after the training thread's next GIL
switch interval (issue 12: set-lr acknowledged within one step + 20 ms).

The training thread holds the GIL; the outbox's sender is another Python thread. Without
the hand-over, the ack sits in the outbox queue until the sender wins the GIL (5 ms, the
switch interval, when the loop is pure Python). `Outbox.hand_over` waits, GIL released,
until the sender has taken the queue. In-process, no server: the stream's consumer is a
plain thread iterating `Outbox.stream`, as gRPC's request thread does.
"""
from __future__ import annotations

import threading
import time

from trainctl.attach import session as session_mod
from trainctl.attach.steer import Outcome
from trainctl.outbox import Outbox
from trainctl.v1 import trainctl_pb2 as pb


def _consumer(outbox: Outbox, stop: threading.Event, got: list) -> threading.Thread:
    def run():
        hello = pb.WorkerMessage(hello=pb.Hello(worker_id="w"))
        for msg in outbox.stream(hello, lambda: pb.Heartbeat(), 60.0, stop):
            got.append(msg)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:  # the hello: the stream is open
        time.sleep(0.001)
    assert got, "the stream never started"
    return t


def _ack(command_id: str) -> pb.WorkerMessage:
    return pb.WorkerMessage(ack=pb.ControlAck(experiment_id=1, attempt=1, command_id=command_id, ok=True))


def test_hand_over_returns_once_the_sender_took_the_ack():
    outbox, stop, got = Outbox(), threading.Event(), []
    t = _consumer(outbox, stop, got)
    try:
        outbox.send(_ack("c1"), sticky=True)
        assert outbox.hand_over(30.0) is True
        assert not outbox._items  # taken by the sender, not waiting for it to win the GIL
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert got[1].ack.command_id == "c1"
    finally:
        stop.set()
        outbox.wake()
        t.join(10)


def test_hand_over_without_a_stream_gives_up_after_its_timeout():
    outbox = Outbox()
    outbox.send(_ack("c1"), sticky=True)
    t0 = time.monotonic()
    assert outbox.hand_over(0.05) is False
    assert time.monotonic() - t0 < 5
    assert len(outbox._items) == 1  # still queued: it goes out with the next stream
    assert outbox.hand_over(0.0) is False


def test_session_ack_hands_over_only_while_connected(monkeypatch):
    """Session.ack (called by run.step() when a command applies) hands the ack over while
    the stream is up; during an outage it only queues it (the loop never waits then)."""
    calls = []

    class FakeOutbox:
        def send(self, msg, sticky=False):
            calls.append(("send", msg.ack.command_id, sticky))

        def hand_over(self, timeout):
            calls.append(("hand_over", timeout))
            return True

    s = session_mod.Session.__new__(session_mod.Session)  # no threads, no network
    s.outbox, s.experiment_id, s.attempt, s.fenced = FakeOutbox(), 7, 1, False
    s._connected = threading.Event()
    s.ack("down", Outcome(True, 1.0, 2.0), 5)
    assert calls == [("send", "down", True)]
    s._connected.set()
    s.ack("up", Outcome(True, 1.0, 2.0), 6)
    assert calls[1:] == [("send", "up", True), ("hand_over", session_mod.ACK_HANDOVER_S)]
