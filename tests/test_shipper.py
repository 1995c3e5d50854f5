"""The worker's outbox: ordering, batching, resend after reconnect, spill to disk."""
from __future__ import annotations

import threading

from trainctl.v1 import trainctl_pb2 as pb
from trainctl.outbox import Outbox
from trainctl.spill import UnackedBatches


def _batch(seq: int, exp: int = 1, attempt: int = 1) -> pb.MetricBatch:
    b = pb.MetricBatch(experiment_id=exp, attempt=attempt, seq=seq, scope=pb.STEP, names=["loss"])
    b.rows.add(step=seq, values=[seq / 10])
    return b


def test_unacked_batches_spill_to_disk_and_come_back_in_order(tmp_path):
    spill = tmp_path / "spill.bin"
    u = UnackedBatches(in_memory=3, spill_path=spill)
    for seq in range(1, 11):
        u.add((1, 1, seq), _batch(seq))
    assert len(u) == 10 and u.spilled == 7 and spill.exists()
    assert [b.seq for b in u] == list(range(1, 11))
    assert [b.rows[0].values[0] for b in u] == [s / 10 for s in range(1, 11)]
    u.ack(1, 1, 5)
    assert [b.seq for b in u] == [6, 7, 8, 9, 10]
    u.ack(1, 1, 10)
    assert len(u) == 0 and not spill.exists()  # the file goes once everything is acked


def test_without_spill_path_oldest_batches_are_dropped_and_counted():
    u = UnackedBatches(in_memory=2)
    for seq in range(1, 5):
        u.add((1, 1, seq), _batch(seq))
    assert [b.seq for b in u] == [3, 4] and u.dropped == 2


def test_forget_drops_one_run_only(tmp_path):
    u = UnackedBatches(in_memory=1, spill_path=tmp_path / "s.bin")
    u.add((1, 1, 1), _batch(1))
    u.add((2, 1, 1), _batch(1, exp=2))
    u.add((1, 1, 2), _batch(2))
    u.forget(1, 1)
    assert [(b.experiment_id, b.seq) for b in u] == [(2, 1)]


def test_stream_batches_rows_keeps_order_and_resends_after_reconnect(tmp_path):
    out = Outbox(spill_path=tmp_path / "spill.bin")
    for step in range(5):
        out.add_rows(7, 1, [("STEP", step, 0, 1000.0 + step, {"loss": 1.0 / (step + 1), "lr": 0.1})])
    out.send(pb.WorkerMessage(state=pb.StateUpdate(experiment_id=7, attempt=1, state=pb.COMPLETED)), sticky=True)
    stop = threading.Event()
    hello = pb.WorkerMessage(hello=pb.Hello(worker_id="w"))
    stream = out.stream(hello, lambda: pb.Heartbeat(), interval=60, stop=stop)
    msgs = [next(stream) for _ in range(3)]
    assert [m.WhichOneof("msg") for m in msgs] == ["hello", "metrics", "state"]
    batch = msgs[1].metrics
    assert [r.step for r in batch.rows] == [0, 1, 2, 3, 4] and list(batch.names) == ["loss", "lr"]
    stop.set()
    # the server never acked: a new stream resends the batch, then the sticky final state
    again = out.stream(hello, lambda: pb.Heartbeat(), interval=60, stop=threading.Event())
    resent = [next(again) for _ in range(3)]
    assert [m.WhichOneof("msg") for m in resent] == ["hello", "metrics", "state"]
    assert resent[1].metrics.seq == batch.seq
    out.acked(7, 1, batch.seq)
    assert out.pending() == 0


def test_forget_drops_everything_of_a_fenced_attempt_and_nothing_else(tmp_path):
    out = Outbox(spill_path=tmp_path / "spill.bin")
    hello = pb.WorkerMessage(hello=pb.Hello(worker_id="w"))
    out.add_rows(7, 1, [("STEP", 0, 0, 1.0, {"loss": 1.0})])
    out.send(pb.WorkerMessage(ack=pb.ControlAck(experiment_id=7, attempt=1, command_id="c")), sticky=True)
    first = out.stream(hello, lambda: pb.Heartbeat(), interval=60, stop=threading.Event())
    assert [next(first).WhichOneof("msg") for _ in range(3)] == ["hello", "metrics", "ack"]   # sent, unacked
    out.add_rows(7, 1, [("STEP", 1, 0, 2.0, {"loss": 0.5})])                                  # still queued
    out.add_rows(8, 1, [("STEP", 0, 0, 2.0, {"loss": 0.7})])                                  # another run
    out.send(pb.WorkerMessage(state=pb.StateUpdate(experiment_id=7, attempt=1, state=pb.FAILED)), sticky=True)
    out.forget(7, 1)
    out.add_rows(7, 1, [("STEP", 2, 0, 3.0, {"loss": 0.2})])                                  # after the fence
    assert out.pending() == 1
    again = out.stream(hello, lambda: pb.Heartbeat(), interval=60, stop=threading.Event())
    msgs = [next(again) for _ in range(2)]
    assert [m.WhichOneof("msg") for m in msgs] == ["hello", "metrics"]
    assert (msgs[1].metrics.experiment_id, [r.step for r in msgs[1].metrics.rows]) == (8, [0])
    out.acked(8, 1, msgs[1].metrics.seq)
    assert out.pending() == 0
