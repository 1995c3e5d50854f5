"""The Artifacts service over real gRPC: the real server (`create_server`, auth on) in a
thread of this process, on a temp SQLite file and a directory or S3 (moto's real server
process) artifact store; clients use trainctl.artifact_io like the CLI and workers do.
Who may call what, integrity, limits, a full file system, retention, the assignment's
checkpoint; one slow test runs a real `trainctl server` process on s3://."""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
import queue
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from trainctl import artifact_io
from trainctl.codepack import pack
from trainctl.server.app import ServerConfig, create_server
from trainctl.server.artifacts.service import WORKER_ID_METADATA
from trainctl.server.auth import Tokens
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.wire import struct_from_dict

pytest_plugins = ["tests.s3"]  # s3_server: moto's S3 server on loopback, one per session

CLIENT = [("authorization", "Bearer client-secret")]
WORKER = [("authorization", "Bearer worker-secret")]
SPEC = {"name": "spec-run", "model": {"name": "resnet10t"}, "data": {"dataset": "digits", "batch_size": 64},
        "optimizer": {"name": "sgd", "lr": 0.05}, "train": {"epochs": 1}}


class ThreadServer:
    """The real server in its own event loop thread; tests stay synchronous."""

    def __init__(self, config: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self._call(self._start(config))
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.artifacts = pb_grpc.ArtifactsStub(self.channel)
        self.experiments = pb_grpc.ExperimentsStub(self.channel)
        self.store = self.server.live.store
        self.blobs = self.server.artifacts.blobs

    def _call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @staticmethod
    async def _start(config):
        server, port = create_server("127.0.0.1:0", config)
        await server.start()
        return server, port

    def stop(self) -> None:
        self.channel.close()
        self._call(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Worker:
    """A scripted worker's Connect stream (worker token): hello, then what the test sends."""

    def __init__(self, srv: ThreadServer, worker_id: str):
        self.worker_id = worker_id
        self.out: queue.Queue = queue.Queue()
        self.out.put(pb.WorkerMessage(hello=pb.Hello(worker_id=worker_id, hostname="t", accepts_code=True)))
        self.call = pb_grpc.WorkersStub(srv.channel).Connect(iter(self.out.get, None), metadata=WORKER)
        self.received: list[pb.ServerMessage] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for m in self.call:
                with self._cv:
                    self.received.append(m)
                    self._cv.notify_all()
        except grpc.RpcError:
            pass

    def expect(self, kind: str, timeout: float = 20.0, index: int = 0):
        with self._cv:
            ok = self._cv.wait_for(lambda: len([m for m in self.received if m.WhichOneof("msg") == kind]) > index,
                                   timeout)
            assert ok, f"{self.worker_id}: no {kind} #{index}; got {[m.WhichOneof('msg') for m in self.received]}"
            return [getattr(m, kind) for m in self.received if m.WhichOneof("msg") == kind][index]

    def send(self, **fields):
        self.out.put(pb.WorkerMessage(**fields))

    @property
    def metadata(self):
        return [*WORKER, (WORKER_ID_METADATA, self.worker_id)]

    def close(self):
        self.out.put(None)
        self.call.cancel()


@pytest.fixture(params=["dir", "s3"])
def backend(request, monkeypatch):
    if request.param == "dir":
        return None  # the default: <db dir>/artifacts
    s3 = request.getfixturevalue("s3_server")
    for k, v in s3.env.items():  # what a server process would get; s3fs here reads them too
        monkeypatch.setenv(k, v)
    return s3


def start(tmp_path, backend=None, **config) -> ThreadServer:
    if backend is not None:
        config.setdefault("artifacts", backend.url())
    return ThreadServer(ServerConfig(db_url=f"sqlite:///{tmp_path / 'trainctl.db'}", grace=0.5,
                                     tokens=Tokens(client=("client-secret",), worker=("worker-secret",)), **config))


@pytest.fixture
def srv(tmp_path, backend):
    s = start(tmp_path, backend)
    yield s
    s.stop()


def code_tree(root: Path, seed: str = "a") -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "train.py").write_text(f"print('hello {seed}')\n")
    (root / "pkg" / "data.bin").write_bytes(os.urandom(300_000))
    return root


def archive(tmp_path: Path, seed: str = "a") -> Path:
    out = tmp_path / f"code-{seed}.tar"
    pack(code_tree(tmp_path / f"tree-{seed}", seed), out)
    return out


def stream(header: pb.UploadHeader, data: bytes, n: int = 64 * 1024):
    yield pb.UploadChunk(header=header)
    for i in range(0, len(data), n):
        yield pb.UploadChunk(data=data[i:i + n])


def code_header(data: bytes, sha: str | None = None, size: int | None = None) -> pb.UploadHeader:
    return pb.UploadHeader(artifact=pb.Artifact(kind=pb.ARTIFACT_CODE, sha256=sha or hashlib.sha256(data).hexdigest(),
                                                size=len(data) if size is None else size))


def refused(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kw)
    return err.value


def stored_files(srv: ThreadServer) -> list[str]:
    """Every blob and temporary the store holds."""
    return sorted(srv.blobs.digests()) + [f"tmp:{p}" for p in _tmp(srv.blobs)]


def _tmp(blobs):
    if hasattr(blobs, "fs"):
        blobs.fs.invalidate_cache()
        try:
            return blobs.fs.find(f"{blobs.root}/tmp")
        except FileNotFoundError:
            return []
    return [p.name for p in blobs.tmp.iterdir()]


# ------------------------------------------------------------------ code archives

def test_code_upload_stat_download_roundtrip(srv, tmp_path):
    path = archive(tmp_path)
    sha, size = artifact_io.sha256_file(path)
    assert refused(srv.artifacts.Stat, pb.ArtifactRef(sha256=sha), metadata=CLIENT).code() == grpc.StatusCode.NOT_FOUND
    got = artifact_io.upload(srv.artifacts, path, pb.Artifact(kind=pb.ARTIFACT_CODE), metadata=CLIENT)
    assert (got.kind, got.sha256, got.size, got.experiment_id, got.name) == (pb.ARTIFACT_CODE, sha, size, 0, sha)
    # A second submit of the same tree: Stat says it is there (the client skips the upload).
    assert srv.artifacts.Stat(pb.ArtifactRef(sha256=sha), metadata=CLIENT).sha256 == sha
    # Uploading it again anyway is fine and stores nothing twice.
    artifact_io.upload(srv.artifacts, path, pb.Artifact(kind=pb.ARTIFACT_CODE), metadata=CLIENT)
    assert stored_files(srv) == [sha]
    # Workers download code (worker token), also from an offset (a broken download resumed).
    dest = tmp_path / "fetched" / "code.tar"
    rec = artifact_io.download(srv.artifacts, pb.ArtifactRef(sha256=sha), dest, metadata=WORKER)
    assert rec.sha256 == sha and dest.read_bytes() == path.read_bytes()
    chunks = list(srv.artifacts.Download(pb.ArtifactRef(sha256=sha, offset=1000), metadata=WORKER))
    assert chunks[0].artifact.sha256 == sha and b"".join(c.data for c in chunks[1:]) == path.read_bytes()[1000:]
    listed = srv.artifacts.ListArtifacts(pb.ListArtifactsRequest(experiment_id=0), metadata=CLIENT).artifacts
    assert [a.sha256 for a in listed] == [sha]
    bad = refused(lambda: list(srv.artifacts.Download(pb.ArtifactRef(sha256=sha, offset=size + 1), metadata=CLIENT)))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "offset" in bad.details()


def test_a_wrong_sha256_is_invalid_argument_and_stores_nothing(srv, tmp_path):
    data = archive(tmp_path).read_bytes()
    wrong = hashlib.sha256(b"not these bytes").hexdigest()
    err = refused(srv.artifacts.Upload, stream(code_header(data, sha=wrong), data), metadata=CLIENT)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in err.details(), err.details()
    # Fewer bytes than announced: the same.
    err = refused(srv.artifacts.Upload, stream(code_header(data), data[:-10]), metadata=CLIENT)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "size" in err.details(), err.details()
    assert stored_files(srv) == []
    assert srv.artifacts.ListArtifacts(pb.ListArtifactsRequest(), metadata=CLIENT).artifacts == []


def test_oversize_is_refused_naming_the_limit(tmp_path):
    srv = start(tmp_path, max_artifact_mb=1)
    try:
        data = b"x" * (2 << 20)
        err = refused(srv.artifacts.Upload, stream(code_header(data), data), metadata=CLIENT)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1 MB" in err.details() and "--max-artifact-mb" in err.details(), err.details()
        # A header that understates the size cannot sneak more bytes in.
        err = refused(srv.artifacts.Upload, stream(code_header(data, size=1000), data), metadata=CLIENT)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "more bytes than announced" in err.details()
        assert stored_files(srv) == []
    finally:
        srv.stop()


def test_a_code_archive_with_a_dotdot_member_is_refused_naming_it(srv, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("train.py", "../x"):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"hello"))
    data = buf.getvalue()
    err = refused(srv.artifacts.Upload, stream(code_header(data), data), metadata=CLIENT)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'../x'" in err.details(), err.details()
    assert stored_files(srv) == [] and srv.store.find_artifact(hashlib.sha256(data).hexdigest()) is None


def test_a_worker_token_cannot_upload_code_nor_collect_garbage(srv, tmp_path):
    path = archive(tmp_path)
    err = refused(artifact_io.upload, srv.artifacts, path, pb.Artifact(kind=pb.ARTIFACT_CODE), metadata=WORKER)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "client token" in err.details()
    err = refused(srv.artifacts.CollectGarbage, pb.GcRequest(), metadata=WORKER)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = refused(srv.artifacts.Stat, pb.ArtifactRef(sha256="0" * 64))  # no token at all
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stored_files(srv) == []


def test_an_upload_broken_off_midway_leaves_nothing(srv, tmp_path):
    data = archive(tmp_path).read_bytes()

    def broken():
        yield from list(stream(code_header(data), data))[:3]  # the header and two chunks
        raise ConnectionError("client died")

    with pytest.raises(grpc.RpcError):
        srv.artifacts.Upload(broken(), metadata=CLIENT)
    deadline = time.monotonic() + 20
    while stored_files(srv) and time.monotonic() < deadline:  # the server notices the cancel
        time.sleep(0.1)
    assert stored_files(srv) == [] and srv.store.find_artifact(hashlib.sha256(data).hexdigest()) is None


# ------------------------------------------------------------------ checkpoints and files: who may upload

def test_checkpoints_only_from_the_lease_holder_and_the_next_attempt_gets_the_newest_delivered(tmp_path):
    srv = start(tmp_path, lease_timeout=2.0, heartbeat_interval=0.2)
    w1 = w2 = None
    try:
        x = srv.experiments.Submit(pb.SubmitRequest(spec=struct_from_dict(SPEC)), metadata=CLIENT)
        w1 = Worker(srv, "w1")
        a = w1.expect("assignment")
        assert (a.experiment_id, a.attempt, a.code_sha256, a.HasField("checkpoint")) == (x.id, 1, "", False)
        w2 = Worker(srv, "w2")
        w2.expect("welcome")
        w1.send(metrics=pb.MetricBatch(experiment_id=x.id, attempt=1, seq=1, scope=pb.STEP, names=["loss"],
                                       rows=[pb.MetricRow(step=s, values=[1.0]) for s in range(10)]))
        w1.expect("batch_ack")
        ck = tmp_path / "ck.pt"

        def up(step, metadata, attempt=1, name=None, run_token=""):
            ck.write_bytes(os.urandom(50_000))
            return artifact_io.upload(srv.artifacts, ck, pb.Artifact(
                kind=pb.ARTIFACT_CHECKPOINT, experiment_id=x.id, attempt=attempt, step=step,
                name=name or f"ckpt-{step}-a{attempt}.pt"), metadata=metadata, run_token=run_token)

        for who, meta, attempt in [("another worker", w2.metadata, 1), ("the holder, another attempt", w1.metadata, 2),
                                   ("no worker id", WORKER, 1), ("a client token", CLIENT, 1),
                                   ("a run token of a spec run", CLIENT, 1)]:
            err = refused(up, 5, meta, attempt, run_token="x" * 43 if "run token" in who else "")
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (who, err.details())
        assert srv.store.list_artifacts(x.id) == [] and stored_files(srv) == []
        w1.send(heartbeat=pb.Heartbeat(experiment_id=x.id, attempt=1))
        up(10, w1.metadata)
        up(15, w1.metadata)  # steps 10..14 never reached the store: not a resume point
        assert [c.step for c in srv.store.list_artifacts(x.id)] == [10, 15]
        w1.close()  # the worker is lost; its lease expires; w2 gets attempt 2
        a2 = w2.expect("assignment", timeout=30)
        assert (a2.experiment_id, a2.attempt, a2.delivered_steps) == (x.id, 2, 10)
        assert (a2.checkpoint.name, a2.checkpoint.step, a2.checkpoint.kind) == ("ckpt-10-a1.pt", 10, pb.ARTIFACT_CHECKPOINT)
        err = refused(up, 20, w1.metadata)  # the old attempt is fenced
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        got = artifact_io.download(srv.artifacts, pb.ArtifactRef(experiment_id=x.id, name="ckpt-10-a1.pt"),
                                   tmp_path / "resume" / "ck.pt", metadata=w2.metadata)
        assert got.sha256 == a2.checkpoint.sha256
    finally:
        for w in (w1, w2):
            if w is not None:
                w.close()
        srv.stop()


def test_a_code_run_is_assigned_with_its_archive_and_gc_keeps_that_archive(tmp_path):
    srv = start(tmp_path)
    w = None
    try:
        path = archive(tmp_path)
        rec = artifact_io.upload(srv.artifacts, path, pb.Artifact(kind=pb.ARTIFACT_CODE), metadata=CLIENT)
        x = srv.experiments.Submit(pb.SubmitRequest(spec=struct_from_dict({"name": "job", "command": "true"}),
                                                    code_sha256=rec.sha256), metadata=CLIENT)
        w = Worker(srv, "w1")
        a = w.expect("assignment")
        assert (a.experiment_id, a.code_sha256, a.HasField("checkpoint")) == (x.id, rec.sha256, False)
        srv.server.artifacts.keeper.code_grace_s = 0.0  # unreferenced code goes at once: this one is used
        srv.artifacts.CollectGarbage(pb.GcRequest(), metadata=CLIENT)
        assert srv.artifacts.Stat(pb.ArtifactRef(sha256=rec.sha256), metadata=WORKER).sha256 == rec.sha256
    finally:
        if w is not None:
            w.close()
        srv.stop()


def test_an_attached_run_uploads_with_its_run_token_only(srv, tmp_path):
    a = srv.experiments.Attach(pb.AttachRequest(name="mine", config=struct_from_dict({"lr": 0.1})), metadata=CLIENT)
    f = tmp_path / "model.pt"
    f.write_bytes(os.urandom(10_000))

    def up(run_token, attempt=a.attempt, kind=pb.ARTIFACT_FILE, meta=CLIENT):
        return artifact_io.upload(srv.artifacts, f, pb.Artifact(kind=kind, experiment_id=a.experiment.id,
                                                                attempt=attempt, name="model.pt"),
                                  metadata=meta, run_token=run_token)

    for token, attempt in [("", a.attempt), ("x" * 43, a.attempt), (a.run_token, a.attempt + 1)]:
        err = refused(up, token, attempt)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    got = up(a.run_token)
    assert (got.name, got.kind, got.experiment_id) == ("model.pt", pb.ARTIFACT_FILE, a.experiment.id)
    assert up(a.run_token, kind=pb.ARTIFACT_CHECKPOINT).kind == pb.ARTIFACT_CHECKPOINT  # same name: replaced
    by_name = srv.artifacts.Stat(pb.ArtifactRef(experiment_id=a.experiment.id, name="model.pt"), metadata=WORKER)
    assert (by_name.kind, by_name.size) == (pb.ARTIFACT_CHECKPOINT, 10_000)
    listed = srv.artifacts.ListArtifacts(pb.ListArtifactsRequest(experiment_id=a.experiment.id), metadata=WORKER)
    assert [(x.name, x.kind) for x in listed.artifacts] == [("model.pt", pb.ARTIFACT_CHECKPOINT)]
    err = refused(srv.artifacts.ListArtifacts, pb.ListArtifactsRequest(experiment_id=999), metadata=CLIENT)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_retention_on_upload_and_gc_over_grpc(srv, tmp_path):
    a = srv.experiments.Attach(pb.AttachRequest(name="ck", config=struct_from_dict({})), metadata=CLIENT)
    f = tmp_path / "ck.pt"
    for step in (1, 2, 3, 4, 5):
        f.write_bytes(os.urandom(20_000))
        artifact_io.upload(srv.artifacts, f, pb.Artifact(kind=pb.ARTIFACT_CHECKPOINT, experiment_id=a.experiment.id,
                                                         attempt=1, step=step, name=f"ck-{step}"),
                           metadata=CLIENT, run_token=a.run_token)
    kept = srv.artifacts.ListArtifacts(pb.ListArtifactsRequest(experiment_id=a.experiment.id), metadata=CLIENT)
    assert [c.step for c in kept.artifacts] == [3, 4, 5]  # the default 3; the older blobs freed at once
    assert sorted(stored_files(srv)) == sorted(c.sha256 for c in kept.artifacts)
    stray = os.urandom(1000)
    srv.blobs.put([stray], hashlib.sha256(stray).hexdigest(), len(stray))  # a crash between blob and record
    dry = srv.artifacts.CollectGarbage(pb.GcRequest(dry_run=True), metadata=CLIENT)
    assert (dry.artifacts_removed, dry.blobs_removed, dry.bytes_freed) == (0, 1, 1000) and len(stored_files(srv)) == 4
    real = srv.artifacts.CollectGarbage(pb.GcRequest(), metadata=CLIENT)
    assert (real.artifacts_removed, real.blobs_removed, real.bytes_freed) == (0, 1, 1000)
    assert len(stored_files(srv)) == 3


def test_a_missing_or_corrupted_blob_is_never_served_as_good(tmp_path):
    srv = start(tmp_path)
    try:
        path = archive(tmp_path)
        rec = artifact_io.upload(srv.artifacts, path, pb.Artifact(kind=pb.ARTIFACT_CODE), metadata=CLIENT)
        blob = srv.blobs.path(rec.sha256)
        blob.write_bytes(b"Z" + blob.read_bytes()[1:])  # bit rot on the server's disk
        dest = tmp_path / "out" / "code.tar"
        with pytest.raises(artifact_io.IntegrityError):
            artifact_io.download(srv.artifacts, pb.ArtifactRef(sha256=rec.sha256), dest, metadata=CLIENT)
        assert not dest.exists() and list(dest.parent.iterdir()) == []
        blob.unlink()
        err = refused(srv.artifacts.Stat, pb.ArtifactRef(sha256=rec.sha256), metadata=CLIENT)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "missing" in err.details()  # so the client re-uploads
        err = refused(artifact_io.download, srv.artifacts, pb.ArtifactRef(sha256=rec.sha256), dest, metadata=CLIENT)
        assert err.code() == grpc.StatusCode.DATA_LOSS
        artifact_io.upload(srv.artifacts, path, pb.Artifact(kind=pb.ARTIFACT_CODE), metadata=CLIENT)  # heals
        assert artifact_io.download(srv.artifacts, pb.ArtifactRef(sha256=rec.sha256), dest, metadata=CLIENT)
    finally:
        srv.stop()


# ------------------------------------------------------------------ a full file system

def _mount_tmpfs(where: Path, size: str) -> str | None:
    """None when mounted, else why not."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root and mount(8) to make a small tmpfs"
    where.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs failed: {r.stderr.strip()}"


def test_a_full_file_system_fails_the_upload_cleanly(tmp_path):
    store_dir = tmp_path / "small"
    why = _mount_tmpfs(store_dir, "3m")
    if why:
        pytest.skip(why)
    srv = None
    try:
        srv = start(tmp_path, artifacts=str(store_dir))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("big.bin")
            info.size = 4 << 20
            tar.addfile(info, io.BytesIO(os.urandom(info.size)))
        data = buf.getvalue()
        err = refused(srv.artifacts.Upload, stream(code_header(data), data), metadata=CLIENT)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in err.details(), err.details()
        assert stored_files(srv) == [] and srv.store.find_artifact(hashlib.sha256(data).hexdigest()) is None
        assert [p for p in store_dir.rglob("*") if p.is_file()] == []  # no partial blob, no temporary
        small = archive(tmp_path)  # the store works again once the big upload is gone
        rec = artifact_io.upload(srv.artifacts, small, pb.Artifact(kind=pb.ARTIFACT_CODE), metadata=CLIENT)
        assert stored_files(srv) == [rec.sha256]
    finally:
        if srv is not None:
            srv.stop()
        subprocess.run(["umount", str(store_dir)], check=False)


# ------------------------------------------------------------------ a real server process on S3

@pytest.mark.slow
def test_a_server_process_stores_code_on_s3(tmp_path, s3_server):
    from tests.conftest import Proc, free_port, wait_healthy

    address = f"127.0.0.1:{free_port()}"
    url = s3_server.url()
    proc = Proc(["server", "--listen", address, "--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--artifacts", url],
                tmp_path / "server.log", env=s3_server.env)
    try:
        wait_healthy(address, proc, timeout=120)
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.ArtifactsStub(ch)
            path = archive(tmp_path)
            rec = artifact_io.upload(stub, path, pb.Artifact(kind=pb.ARTIFACT_CODE))
            assert stub.Stat(pb.ArtifactRef(sha256=rec.sha256)).size == path.stat().st_size
            got = artifact_io.download(stub, pb.ArtifactRef(sha256=rec.sha256), tmp_path / "back.tar")
            assert got.sha256 == rec.sha256 and (tmp_path / "back.tar").read_bytes() == path.read_bytes()
        from trainctl.server.artifacts.remote import FsspecBlobStore

        assert list(FsspecBlobStore(url, s3_server.storage_options).digests()) == [rec.sha256]
    finally:
        proc.stop()
    assert "artifact store: " + url in proc.output()
