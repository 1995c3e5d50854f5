"""Spec runs' checkpoints through the artifact store (workers/checkpoint_sync.py, issue 13
item 6): uploaded in the background as the engine completes them, fetched before a run
on a box that lacks them, and resumed only after the same lineage checks as a local file.

Fast, in-process: the uploader and fetcher against a recording Artifacts server on real
gRPC loopback (its faults scripted: transient errors, a refusal, a stalled upload, torn
bytes), the engine's callback with a real Trainer. With real processes, a worker
SIGKILLed mid-run and another with its own empty working directory resuming from the
server's artifact store: tests/test_faults.py::test_worker_killed_mid_run_resumes_from_checkpoint."""
from __future__ import annotations

import hashlib
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.workers.checkpoint_sync import CheckpointSync
from trainctl.workers.engine.context import Lineage, TrainingContext
from trainctl.workers.pipe import Checkpointed, relay


class RecordingArtifacts(pb_grpc.ArtifactsServicer):
    """The Artifacts calls CheckpointSync makes, kept in memory; faults scripted per call."""

    def __init__(self):
        self.records: dict[tuple[int, str], pb.Artifact] = {}
        self.blobs: dict[str, bytes] = {}
        self.uploads = 0
        self.callers: list = []                          # the worker id each Upload named
        self.downloads = 0
        self.fail_uploads: list[grpc.StatusCode] = []   # the next Upload calls fail with these
        self.hold = threading.Event()                   # cleared: an Upload waits for it
        self.hold.set()
        self.torn = False                               # Download sends bytes that do not match

    def Upload(self, request_iterator, context):
        self.uploads += 1
        self.callers.append(dict(context.invocation_metadata()).get("trainctl-worker-id"))
        self.hold.wait(30)
        header, data = None, bytearray()
        for chunk in request_iterator:
            if chunk.WhichOneof("part") == "header":
                header = chunk.header
            else:
                data += chunk.data
        if self.fail_uploads:
            code = self.fail_uploads.pop(0)
            context.abort(code, f"scripted {code.name}")
        art = header.artifact
        if hashlib.sha256(data).hexdigest() != art.sha256 or len(data) != art.size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sha256 mismatch")
        self.blobs[art.sha256] = bytes(data)
        self.records[(art.experiment_id, art.name)] = art
        return art

    def Download(self, request, context):
        self.downloads += 1
        if request.sha256:
            art = next((a for a in self.records.values() if a.sha256 == request.sha256), None)
        else:
            art = self.records.get((request.experiment_id, request.name))
        if art is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such artifact")
        yield pb.DownloadChunk(artifact=art)
        data = self.blobs[art.sha256]
        yield pb.DownloadChunk(data=data[:-1] + b"\0" if self.torn else data)

    def put(self, experiment_id: int, name: str, data: bytes, step: int, attempt: int = 1) -> pb.Artifact:
        art = pb.Artifact(experiment_id=experiment_id, attempt=attempt, name=name, kind=pb.ARTIFACT_CHECKPOINT,
                          sha256=hashlib.sha256(data).hexdigest(), size=len(data), step=step)
        self.blobs[art.sha256] = data
        self.records[(experiment_id, name)] = art
        return art


@pytest.fixture
def store():
    servicer = RecordingArtifacts()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_ArtifactsServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    servicer.hold.set()
    server.stop(0)


@pytest.fixture
def sync(store):
    s = CheckpointSync(store.address, worker_id="w7", backoff_s=0.01)
    yield s
    s.close()


def _file(d: Path, name: str, data: bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)
    return d / name


def _assignment(exp_id: int = 7, attempt: int = 2, checkpoint: pb.Artifact | None = None, **kw) -> pb.Assignment:
    a = pb.Assignment(experiment_id=exp_id, attempt=attempt, store_id="s1", **kw)
    if checkpoint is not None:
        a.checkpoint.CopyFrom(checkpoint)
    return a


# ---------------------------------------------------------------------- upload


def test_each_checkpoint_is_uploaded_under_its_engine_name_and_a_resend_is_harmless(tmp_path, store, sync):
    p8 = _file(tmp_path, "ckpt-8-a1.pt", b"eight" * 1000)
    p16 = _file(tmp_path, "ckpt-16-a1.pt", b"sixteen" * 1000)
    sync.upload(7, 1, p8, 8)
    sync.upload(7, 1, p16, 16)
    assert sync.drain(10)
    assert sorted(store.records) == [(7, "ckpt-16-a1.pt"), (7, "ckpt-8-a1.pt")]
    rec = store.records[(7, "ckpt-16-a1.pt")]
    assert (rec.kind, rec.attempt, rec.step, rec.size) == (pb.ARTIFACT_CHECKPOINT, 1, 16, p16.stat().st_size)
    assert store.blobs[rec.sha256] == p16.read_bytes()
    assert store.callers == ["w7", "w7"]  # the session holding the lease, named as in its Hello
    sync.upload(7, 1, p16, 16)          # again (a retried upload whose answer was lost): same record
    assert sync.drain(10)
    assert len(store.records) == 2 and store.records[(7, "ckpt-16-a1.pt")].sha256 == rec.sha256


def test_upload_never_waits_for_the_server(tmp_path, store, sync):
    store.hold.clear()                  # the server takes its time with every upload
    paths = [_file(tmp_path, f"ckpt-{s}-a1.pt", b"x" * 100) for s in (4, 8, 12)]
    t0 = time.perf_counter()
    for s, p in zip((4, 8, 12), paths):
        sync.upload(7, 1, p, s)
    assert time.perf_counter() - t0 < 0.05
    assert not sync.drain(0.3) and sync.pending() == 3
    store.hold.set()
    assert sync.drain(10) and len(store.records) == 3


def test_transient_errors_are_retried_a_refusal_is_not(tmp_path, store, sync):
    p = _file(tmp_path, "ckpt-8-a1.pt", b"a" * 10)
    store.fail_uploads = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    sync.upload(7, 1, p, 8)
    assert sync.drain(10)
    assert store.uploads == 3 and (7, "ckpt-8-a1.pt") in store.records
    # PERMISSION_DENIED: the lease is gone (fenced, or the run ended); never retried
    store.fail_uploads = [grpc.StatusCode.PERMISSION_DENIED]
    q = _file(tmp_path, "ckpt-16-a1.pt", b"b" * 10)
    sync.upload(7, 1, q, 16)
    assert sync.drain(10)
    assert store.uploads == 4 and (7, "ckpt-16-a1.pt") not in store.records


def test_a_pruned_file_is_skipped_and_the_next_one_still_goes(tmp_path, store, sync):
    sync.upload(7, 1, tmp_path / "ckpt-4-a1.pt", 4)    # pruned before its turn came
    sync.upload(7, 1, _file(tmp_path, "ckpt-8-a1.pt", b"c"), 8)
    assert sync.drain(10)
    assert list(store.records) == [(7, "ckpt-8-a1.pt")]


def test_a_fenced_attempt_sends_nothing_more(tmp_path, store, sync):
    store.hold.clear()
    for s in (4, 8, 12):
        sync.upload(7, 1, _file(tmp_path, f"ckpt-{s}-a1.pt", b"d" * 10), s)
    time.sleep(0.2)                     # the first is on the wire, two wait
    sync.forget(7, 1)
    sync.upload(7, 1, _file(tmp_path, "ckpt-16-a1.pt", b"e"), 16)   # after the fence: dropped at once
    store.hold.set()
    assert sync.drain(10)
    assert list(store.records) == [(7, "ckpt-4-a1.pt")] and store.uploads == 1
    sync.upload(7, 2, _file(tmp_path, "ckpt-16-a2.pt", b"f"), 16)   # the next attempt is not affected
    assert sync.drain(10) and (7, "ckpt-16-a2.pt") in store.records


# ---------------------------------------------------------------------- fetch


def test_fetch_downloads_what_the_box_lacks_and_keeps_the_local_fast_path(tmp_path, store, sync):
    notes: list[str] = []
    art = store.put(7, "ckpt-8-a1.pt", b"remote" * 100, 8)
    d = tmp_path / "exp-7"
    assert sync.fetch(_assignment(), d, notes.append) is None and store.downloads == 0  # none offered
    got = sync.fetch(_assignment(checkpoint=art), d, notes.append)
    assert got == d / "ckpt-8-a1.pt" and got.read_bytes() == b"remote" * 100
    assert store.downloads == 1 and "ckpt-8-a1.pt fetched from the artifact store" in notes[-1]
    assert sorted(p.name for p in d.iterdir()) == ["ckpt-8-a1.pt"]   # no temp file left
    assert sync.fetch(_assignment(checkpoint=art), d, notes.append) == got
    assert store.downloads == 1                                      # on disk already: not fetched again
    got.write_bytes(b"torn")                                         # a local copy of another size
    assert sync.fetch(_assignment(checkpoint=art), d, notes.append).read_bytes() == b"remote" * 100
    assert store.downloads == 2


@pytest.mark.parametrize("name", ["../../../evil.pt", "ckpt-8-a1.pt/../../x", "model.pt", "ckpt-8-a1.pt.corrupt"])
def test_fetch_puts_only_engine_checkpoint_names_on_disk(tmp_path, store, sync, name):
    notes: list[str] = []
    art = store.put(7, name, b"z", 8)
    assert sync.fetch(_assignment(checkpoint=art), tmp_path / "a" / "b", notes.append) is None
    assert store.downloads == 0 and [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert "not used" in notes[-1]


def test_fetch_refuses_another_experiments_checkpoint(tmp_path, store, sync):
    notes: list[str] = []
    art = store.put(9, "ckpt-8-a1.pt", b"other", 8)
    assert sync.fetch(_assignment(exp_id=7, checkpoint=art), tmp_path, notes.append) is None
    assert store.downloads == 0 and "not a checkpoint of this experiment" in notes[-1]


def test_torn_download_leaves_nothing_and_the_run_starts_anyway(tmp_path, store, sync):
    notes: list[str] = []
    art = store.put(7, "ckpt-8-a1.pt", b"q" * 5000, 8)
    store.torn = True
    assert sync.fetch(_assignment(checkpoint=art), tmp_path, notes.append) is None
    assert "damaged" in notes[-1] and store.downloads == 3           # retried, then given up
    assert list(tmp_path.iterdir()) == []


def test_server_unreachable_fetch_gives_up_with_a_note(tmp_path):
    from tests.conftest import free_port

    notes: list[str] = []
    s = CheckpointSync(f"127.0.0.1:{free_port()}", backoff_s=0.01)
    art = pb.Artifact(experiment_id=7, name="ckpt-8-a1.pt", sha256="0" * 64, size=3, step=8)
    t0 = time.monotonic()
    assert s.fetch(_assignment(checkpoint=art), tmp_path, notes.append) is None
    assert time.monotonic() - t0 < 20 and "UNAVAILABLE" in notes[-1]


# ---------------------------------------------------------------------- lineage


def test_a_downloaded_checkpoint_passes_the_same_lineage_checks_as_a_local_one(tmp_path, store, sync):
    import torch

    from trainctl.workers.engine.checkpoint import load_for_resume, save_checkpoint

    torch.manual_seed(0)
    state = {"step": 8, "epoch": 1, "w": torch.ones(3)}
    src = save_checkpoint(tmp_path / "box-a", state, Lineage("s1", 7, 1), keep=3)
    art = store.put(7, src.name, src.read_bytes(), 8)
    # The same bytes offered as experiment 8's (a record mixed up, a copied blob): fetched,
    # then refused by its recorded lineage exactly as a local file would be.
    forged = store.put(8, src.name, src.read_bytes(), 8)
    other = tmp_path / "box-b" / "exp-8"
    assert sync.fetch(_assignment(exp_id=8, checkpoint=forged), other, lambda t: None) is not None
    assert load_for_resume(other, Lineage("s1", 8, 2, delivered_steps=8, delivered_epochs=2)) is None
    # Past what the store holds (its rows never arrived): skipped
    mine = tmp_path / "box-b" / "exp-7"
    assert sync.fetch(_assignment(checkpoint=art), mine, lambda t: None) is not None
    assert load_for_resume(mine, Lineage("s1", 7, 2, delivered_steps=7, delivered_epochs=2)) is None
    # The right lineage within what the store holds: resumed
    found = load_for_resume(mine, Lineage("s1", 7, 2, delivered_steps=8, delivered_epochs=2))
    assert found is not None and found[0].name == "ckpt-8-a1.pt" and torch.equal(found[1]["w"], torch.ones(3))


# ---------------------------------------------------------------------- the engine's side


def test_the_engine_reports_each_complete_checkpoint(tmp_path):
    import torch

    from tests.test_loop_support import tiny_spec
    from trainctl.workers.engine.loop import Trainer

    seen = []

    def on_checkpoint(path: str, step: int) -> None:
        p = Path(path)
        seen.append((p.name, step, p.is_file(), not list(p.parent.glob("*.tmp"))))

    torch.set_num_threads(1)
    ctx = TrainingContext(checkpoint_dir=str(tmp_path), lineage=Lineage("s1", 7, 1), on_checkpoint=on_checkpoint)
    Trainer(tiny_spec(train={"epochs": 3, "max_steps_per_epoch": 2}), ctx).run()
    assert seen == [("ckpt-2-a1.pt", 2, True, True), ("ckpt-4-a1.pt", 4, True, True),
                    ("ckpt-6-a1.pt", 6, True, True)]
    # across the process boundary it is a typed message relayed to the same callback
    got = []
    assert relay(Checkpointed("/x/ckpt-2-a1.pt", 2), TrainingContext(on_checkpoint=lambda p, s: got.append((p, s))),
                 on_rows=None)
    assert got == [("/x/ckpt-2-a1.pt", 2)]
