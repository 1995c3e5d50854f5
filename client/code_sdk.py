"""The client's side of submitted code and the artifact store, behind thin `Client` methods
(upload_code, submit(..., code_dir=), artifacts, download, gc) so sdk.py stays small.

Packing happens in a temporary directory; the archive's sha256 names it, and a Stat by
that digest tells whether the server already has it (then nothing is sent: the same
tree submitted twice is uploaded once).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import grpc

from trainctl import artifact_io, codepack
from trainctl.v1 import trainctl_pb2 as pb

Progress = Optional[Callable[[int, int], None]]
KINDS = {"code": pb.ARTIFACT_CODE, "checkpoint": pb.ARTIFACT_CHECKPOINT, "file": pb.ARTIFACT_FILE}
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class CodeUpload:
    sha256: str
    size: int            # archive bytes
    files: int           # files and links packed
    uploaded: bool       # False: the server had it already (Stat hit), nothing was sent
    pack_s: float
    upload_s: float


@dataclass(frozen=True)
class ArtifactInfo:
    experiment_id: int
    attempt: int
    name: str
    kind: str            # code, checkpoint, file
    sha256: str
    size: int
    step: int
    created_at: Optional[float]

    @classmethod
    def from_pb(cls, a: pb.Artifact) -> "ArtifactInfo":
        kind = pb.ArtifactKind.Name(a.kind).removeprefix("ARTIFACT_").lower() if a.kind else "unknown"
        created = a.created_at.ToNanoseconds() / 1e9 if a.HasField("created_at") else None
        return cls(experiment_id=a.experiment_id, attempt=a.attempt, name=a.name, kind=kind, sha256=a.sha256,
                   size=a.size, step=a.step, created_at=created)


def _err(exc: grpc.RpcError):
    from trainctl.client.sdk import _error   # sdk imports this module lazily: no cycle at load

    return _error(exc)


def _transfer_timeout(size: int) -> float:
    """Long enough for a slow link (1 MB/s), short enough that a hung server is noticed."""
    return 120.0 + size / 1e6


def default_job_name(code_dir: str | os.PathLike) -> str:
    """The job's name when the YAML gives none: the code folder's name, made valid."""
    name = _NAME_BAD.sub("-", Path(code_dir).resolve().name).strip("-._") or "code"
    return name[:128]


def upload_code(client, code_dir: str | os.PathLike, *, max_bytes: int = codepack.DEFAULT_MAX_BYTES,
                progress: Progress = None, force: bool = False) -> CodeUpload:
    """Pack `code_dir` and make sure the server has the archive (force: send it even if
    Stat says it is there). Raises codepack.TooBig / ArchiveError before anything is
    sent, TrainctlError from the server."""
    t0 = time.perf_counter()
    entries = codepack.scan(code_dir)
    key = codepack.tree_key(entries)
    known = None if force else _PackMemo.get(code_dir, key)
    if known is not None and _server_has(client, known.sha256, known.bytes):
        return CodeUpload(known.sha256, known.bytes, known.files, False, time.perf_counter() - t0, 0.0)
    with tempfile.TemporaryDirectory(prefix="trainctl-code-") as tmp:
        path = Path(tmp) / "code.tar"
        packed = codepack.pack(code_dir, path, max_bytes, entries)
        _PackMemo.put(code_dir, key, packed)
        sha, size = packed.sha256, packed.bytes
        pack_s = time.perf_counter() - t0
        if not force and _server_has(client, sha, size):
            return CodeUpload(sha, size, packed.files, False, pack_s, 0.0)
        t1 = time.perf_counter()
        art = pb.Artifact(kind=pb.ARTIFACT_CODE, experiment_id=0, name=sha, sha256=sha, size=size)  # hashed while packed
        try:
            artifact_io.upload(client._artifacts, path, art, metadata=client._metadata(),
                               timeout=_transfer_timeout(size), progress=progress)
        except grpc.RpcError as exc:
            raise _err(exc) from None
        return CodeUpload(sha, size, packed.files, True, pack_s, time.perf_counter() - t1)


def _server_has(client, sha: str, size: int) -> bool:
    try:
        have = client._artifacts.Stat(pb.ArtifactRef(sha256=sha), metadata=client._metadata(),
                                      timeout=client.timeout)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise _err(exc) from None
        return False
    return have.kind == pb.ARTIFACT_CODE and have.size == size


class _PackMemo:
    """The last archive packed from each folder, keyed by `codepack.tree_key`: an unchanged
    tree is neither packed nor hashed again, only asked about (a file in the user's cache;
    losing it costs one re-pack)."""
    PATH = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainctl" / "packed.json"
    KEEP = 64

    @classmethod
    def _load(cls) -> dict:
        try:
            return json.loads(cls.PATH.read_text())
        except (OSError, ValueError):
            return {}

    @classmethod
    def get(cls, code_dir, key: str) -> Optional[codepack.PackResult]:
        hit = cls._load().get(os.path.realpath(code_dir))
        if not hit or hit.get("key") != key:
            return None
        try:
            return codepack.PackResult(files=int(hit["files"]), bytes=int(hit["bytes"]), sha256=str(hit["sha256"]))
        except (KeyError, TypeError, ValueError):
            return None

    @classmethod
    def put(cls, code_dir, key: str, packed: codepack.PackResult) -> None:
        memo = cls._load()
        memo.pop(os.path.realpath(code_dir), None)
        memo[os.path.realpath(code_dir)] = {"key": key, "files": packed.files, "bytes": packed.bytes,
                                            "sha256": packed.sha256}
        memo = dict(list(memo.items())[-cls.KEEP:])
        try:
            cls.PATH.parent.mkdir(parents=True, exist_ok=True)
            tmp = cls.PATH.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, cls.PATH)
        except OSError:
            pass  # a read-only home: every submit packs, nothing else changes


def submit_with_code(client, data: dict, code_dir: str | os.PathLike, *, max_bytes: int,
                     progress: Progress = None):
    """Upload (unless present) and Submit; (ExperimentInfo, CodeUpload). An archive that
    `gc` collected between our Stat and the Submit (FAILED_PRECONDITION) is sent again,
    once."""
    from trainctl.client.sdk import TrainctlError

    if not data.get("name"):
        data = {**data, "name": default_job_name(code_dir)}
    up = upload_code(client, code_dir, max_bytes=max_bytes, progress=progress)
    try:
        return client.submit(data, code_sha256=up.sha256), up
    except TrainctlError as exc:
        if exc.code != "FAILED_PRECONDITION" or up.uploaded or "code_sha256" not in exc.message:
            raise
    up = upload_code(client, code_dir, max_bytes=max_bytes, progress=progress, force=True)
    return client.submit(data, code_sha256=up.sha256), up


def list_artifacts(client, id: int, kind: Optional[str] = None) -> list[ArtifactInfo]:
    req = pb.ListArtifactsRequest(experiment_id=id, kind=KINDS[kind] if kind else pb.ARTIFACT_KIND_UNSPECIFIED)
    try:
        resp = client._artifacts.ListArtifacts(req, metadata=client._metadata(), timeout=client.timeout)
    except grpc.RpcError as exc:
        raise _err(exc) from None
    return [ArtifactInfo.from_pb(a) for a in resp.artifacts]


def safe_local_name(name: str) -> str:
    """An artifact's name as a file name here: never a path (the server forbids '/', but
    a client does not trust that)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", ".."):
        raise ValueError(f"artifact name {name!r} cannot be a file name")
    return base


def download(client, id: int, name: Optional[str] = None, dest_dir: str | os.PathLike = ".",
             progress_for: Optional[Callable[[ArtifactInfo], Progress]] = None) -> list[tuple[ArtifactInfo, Path]]:
    """Fetch one artifact (`name`) or all of experiment `id` into `dest_dir`, each checked
    against its sha256 (a mismatch leaves no file: artifact_io.IntegrityError)."""
    wanted = list_artifacts(client, id)
    if name is not None:
        wanted = [a for a in wanted if a.name == name]
        if not wanted:
            from trainctl.client.sdk import TrainctlError
            raise TrainctlError("NOT_FOUND", f"experiment {id} has no artifact named {name!r}")
    out = []
    for a in wanted:
        dest = Path(dest_dir) / safe_local_name(a.name)
        ref = pb.ArtifactRef(experiment_id=a.experiment_id, name=a.name)
        try:
            artifact_io.download(client._artifacts, ref, dest, metadata=client._metadata(),
                                 timeout=_transfer_timeout(a.size), progress=progress_for(a) if progress_for else None)
        except grpc.RpcError as exc:
            raise _err(exc) from None
        out.append((a, dest))
    return out


def collect_garbage(client, dry_run: bool = False) -> dict:
    try:
        r = client._artifacts.CollectGarbage(pb.GcRequest(dry_run=dry_run), metadata=client._metadata(),
                                             timeout=max(client.timeout, 300.0))
    except grpc.RpcError as exc:
        raise _err(exc) from None
    return {"dry_run": dry_run, "artifacts_removed": r.artifacts_removed, "blobs_removed": r.blobs_removed,
            "bytes_freed": r.bytes_freed}
