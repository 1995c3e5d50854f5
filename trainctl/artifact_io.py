"""Moving artifacts over the Artifacts service, for every side that does it: the CLI
(code archives, downloads), the worker (code, checkpoints) and the SDK (run.save).

Files are streamed in 1 MiB chunks (never read whole into memory), hashed as they go,
and a download lands in a temporary file beside its destination that is renamed into
place only once its sha256 matched, so a broken transfer never leaves a file that
looks complete. (No fsync: whoever reads a downloaded file checks its sha256 or its
lineage first, and fetches it again when a crash left it short.)
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

from trainctl.v1 import trainctl_pb2 as pb

CHUNK = 1 << 20
Progress = Optional[Callable[[int, int], None]]   # (bytes done, bytes total)
# A worker-token upload names the worker's Connect session here (its Hello.worker_id),
# so the server can check that the session holds the run's lease.
WORKER_ID_METADATA = "trainctl-worker-id"


class IntegrityError(ValueError):
    """Bytes received do not hash to what their record says."""


def sha256_file(path: str | os.PathLike, progress: Progress = None) -> tuple[str, int]:
    """(hex sha256, size) of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    total = os.path.getsize(path)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            size += len(block)
            if progress:
                progress(size, total)
    return h.hexdigest(), size


def upload_chunks(path: str | os.PathLike, header: pb.UploadHeader, progress: Progress = None) -> Iterator[pb.UploadChunk]:
    """The request stream of Artifacts.Upload for a file whose sha256/size are in `header`."""
    yield pb.UploadChunk(header=header)
    done, total = 0, header.artifact.size
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            done += len(block)
            yield pb.UploadChunk(data=block)
            if progress:
                progress(done, total)


def upload(stub, path: str | os.PathLike, artifact: pb.Artifact, *, metadata=None, run_token: str = "",
           timeout: Optional[float] = None, progress: Progress = None) -> pb.Artifact:
    """Upload a file as `artifact` (kind, experiment_id, attempt, name, step filled by the
    caller; sha256 and size computed here unless the caller already knows both, e.g. a
    code archive hashed while it was packed). Returns the stored record."""
    art = pb.Artifact()
    art.CopyFrom(artifact)
    if not (art.sha256 and art.size):
        art.sha256, art.size = sha256_file(path)
    header = pb.UploadHeader(artifact=art, run_token=run_token)
    return stub.Upload(upload_chunks(path, header, progress), metadata=metadata, timeout=timeout)


def download(stub, ref: pb.ArtifactRef, dest: str | os.PathLike, *, metadata=None,
             timeout: Optional[float] = None, progress: Progress = None) -> pb.Artifact:
    """Fetch an artifact into `dest` (a file path). Raises IntegrityError when the bytes do
    not match the record's sha256 (nothing is left at `dest` then)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    record: Optional[pb.Artifact] = None
    h, done = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for chunk in stub.Download(ref, metadata=metadata, timeout=timeout):
                if chunk.WhichOneof("part") == "artifact":
                    record = chunk.artifact
                    continue
                h.update(chunk.data)
                f.write(chunk.data)
                done += len(chunk.data)
                if progress and record is not None:
                    progress(done, record.size)
        if record is None:
            raise IntegrityError("the server sent no artifact record")
        if done != record.size or h.hexdigest() != record.sha256:
            raise IntegrityError(f"{record.name or record.sha256[:12]}: got {done} bytes hashing to "
                                 f"{h.hexdigest()[:12]}, expected {record.size} bytes hashing to {record.sha256[:12]}")
        os.replace(tmp, dest)
        return record
    finally:
        tmp.unlink(missing_ok=True)
