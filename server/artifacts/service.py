"""The Artifacts gRPC service: upload, stat, download, list, collect garbage.

Who may call (auth.py lets client and worker tokens in; each call is checked here):
- ARTIFACT_CODE upload, CollectGarbage: a client token (a worker never adds code).
- ARTIFACT_CHECKPOINT / ARTIFACT_FILE upload for run (experiment X, attempt N): a
  worker token whose Connect session holds X's lease at attempt N (the worker names
  itself in the `trainctl-worker-id` metadata, as its Hello did), or the run token of
  attached experiment X at its current attempt (UploadHeader.run_token).
- Stat, Download, ListArtifacts: any token.
With auth off (no tokens) every caller counts as a client, and the run checks above
still apply to checkpoints and files.

Bytes move in chunks through a thread pool of this service's own (file and network I/O
must not take the store's threads), never whole in memory. An upload is hashed as it
arrives into a temporary; only bytes matching the announced size and sha256 become a
blob, and only then is the record written (retention.Keeper.commit).
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import io
import logging
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from trainctl.artifact_io import WORKER_ID_METADATA  # a worker token's caller names its session
from trainctl.codepack import ArchiveError, check_archive
from trainctl.server.attach import token_hash
from trainctl.server.auth import CLIENT, WORKER, Tokens, bearer
from trainctl.server.guard import bad_request
from trainctl.server.store import entities as E
from trainctl.server.store.artifacts import CHECKPOINT, CODE, check_artifact, is_digest
from trainctl.server.store.entities import Artifact
from trainctl.server.store.errors import NotFound
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

from .base import BlobMissing, BlobStore, BlobWriter, HashOnly, IntegrityError, is_full
from .retention import BlobGone, Keeper

log = logging.getLogger(__name__)

DEFAULT_MAX_MB = 2048
_SPOOL_CHUNK = 1 << 20


def artifact_to_pb(a: Artifact) -> pb.Artifact:
    ts = Timestamp()
    ts.FromNanoseconds(int(a.created_at * 1e9))
    return pb.Artifact(experiment_id=a.experiment_id, attempt=a.attempt, name=a.name,
                       kind=pb.ArtifactKind.Value(a.kind), sha256=a.sha256, size=a.size, step=a.step, created_at=ts)


def _metadata(context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("ascii", "replace")
    return ""


class ArtifactsService(pb_grpc.ArtifactsServicer):
    def __init__(self, live, dispatcher, blobs: BlobStore, *, tokens: Tokens = Tokens(),
                 max_bytes: int = DEFAULT_MAX_MB << 20, io_threads: int = 8, keeper: Keeper | None = None):
        self.live, self.store, self.db = live, live.store, live.db
        self.dispatcher = dispatcher
        self.blobs = blobs
        self.tokens = tokens
        self.max_bytes = max_bytes
        self.keeper = keeper or Keeper(self.store, blobs)
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="artifacts")
        # A remote store's code archives are checked from a local copy made here.
        self.spool_dir = Path(tempfile.gettempdir())

    async def io(self, fn, *args):
        """Run blocking I/O in this service's threads. When the call is cancelled (the
        client went away) the thread's work still finishes before the cancellation goes
        on: cleanup must not race a write in flight, nor miss a temporary that a thread
        was still opening."""
        fut = asyncio.get_running_loop().run_in_executor(self._io, functools.partial(fn, *args))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if not fut.done():
                await asyncio.wait([fut])
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._cancelled_result(fut.result())
            raise

    @staticmethod
    def _cancelled_result(result) -> None:
        """What a cancelled call opened (a blob writer, a spool file): nobody else will
        clean it up."""
        if isinstance(result, BlobWriter):
            result.abort()
        elif isinstance(result, io.IOBase) and isinstance(getattr(result, "name", None), (str, os.PathLike)):
            _discard(result, result.name)

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self.blobs.close()

    # ---------------------------------------------------------------- who may call
    def _role(self, context) -> str | None:
        """CLIENT or WORKER; None with auth off (every caller then counts as a client)."""
        if not self.tokens.enabled:
            return None
        return self.tokens.role_of(bearer(context.invocation_metadata()) or "")

    async def _deny(self, context, message: str) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    async def _check_run(self, context, a: pb.Artifact, run_token: str, role: str | None) -> None:
        """A checkpoint or file of run (a.experiment_id, a.attempt): its lease holder or
        its attached run's token, nobody else."""
        try:
            x = await self.db(self.store.get_experiment, a.experiment_id)
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"artifact.experiment_id: {exc}")
        where = f"experiment {a.experiment_id} attempt {a.attempt}"
        if run_token:
            ok = (x.kind == E.ATTACHED and x.run_token_hash is not None
                  and hmac.compare_digest(x.run_token_hash, token_hash(run_token)))
            if not ok:
                await self._deny(context, f"header.run_token: not the run token of attached experiment "
                                          f"{a.experiment_id}")
            if x.attempt != a.attempt or x.state not in E.ACTIVE_STATES:
                await self._deny(context, f"artifact.attempt: {where} is not live (current attempt "
                                          f"{x.attempt}, {x.state})")
            return
        if role == CLIENT:
            await self._deny(context, "a client token uploads checkpoints and files only for an attached run: "
                                      "header.run_token is required")
        worker_id = _metadata(context, WORKER_ID_METADATA)
        session = self.dispatcher.sessions.get(worker_id) if worker_id else None
        if session is None or session.attached or not self.dispatcher.holds(session, a.experiment_id, a.attempt):
            who = f"worker {worker_id[:80]!r}" if worker_id else f"a caller without {WORKER_ID_METADATA} metadata"
            await self._deny(context, f"{who} does not hold the lease of {where}")

    # ---------------------------------------------------------------- upload
    async def Upload(self, request_iterator, context):
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            await bad_request(context, "Upload", "request: empty stream; the first chunk carries the header")
        if first.WhichOneof("part") != "header":
            await bad_request(context, "Upload", "chunk 0: the first chunk must carry the header")
        header = first.header
        record = await self._check_header(header, context)
        role = self._role(context)
        if record.kind == CODE:
            if role == WORKER:
                await self._deny(context, "a worker token cannot upload code archives (ARTIFACT_CODE); "
                                          "that needs a client token")
        else:
            await self._check_run(context, header.artifact, header.run_token, role)
        return artifact_to_pb(await self._receive(it, record, context))

    async def _check_header(self, header: pb.UploadHeader, context) -> Artifact:
        a = header.artifact
        if a.kind not in (pb.ARTIFACT_CODE, pb.ARTIFACT_CHECKPOINT, pb.ARTIFACT_FILE):
            await bad_request(context, "Upload", f"header.artifact.kind: ARTIFACT_CODE, ARTIFACT_CHECKPOINT or "
                                                 f"ARTIFACT_FILE, got {a.kind}")
        sha = a.sha256.lower()
        if not is_digest(sha):
            await bad_request(context, "Upload", f"header.artifact.sha256: 64 hex digits, got {a.sha256[:80]!r}")
        if a.size < 0 or a.size > self.max_bytes:
            await bad_request(context, "Upload", f"header.artifact.size: {a.size:,} bytes is over the server's "
                                                 f"limit of {self.max_bytes >> 20} MB (--max-artifact-mb)"
                              if a.size > 0 else f"header.artifact.size: must be >= 0, got {a.size}")
        kind = pb.ArtifactKind.Name(a.kind)
        if kind == CODE:  # one record per archive, named by its content
            record = Artifact(experiment_id=0, name=sha, kind=CODE, sha256=sha, size=a.size)
        else:
            if a.experiment_id <= 0:
                await bad_request(context, "Upload", f"header.artifact.experiment_id: a {kind} belongs to an "
                                                     f"experiment (> 0), got {a.experiment_id}")
            record = Artifact(experiment_id=a.experiment_id, name=a.name, kind=kind, sha256=sha, size=a.size,
                              attempt=a.attempt, step=a.step if kind == CHECKPOINT else 0)
        try:
            check_artifact(record)
        except ValueError as exc:
            await bad_request(context, "Upload", f"header.{exc}")
        return record

    async def _receive(self, it, record: Artifact, context) -> Artifact:
        spool = spool_path = None
        writer = None
        error: tuple[grpc.StatusCode, str] | None = None
        bad = grpc.StatusCode.INVALID_ARGUMENT
        try:
            writer = await self.io(self.blobs.writer, record.sha256, record.size)
            check_path = writer.local_path
            if record.kind == CODE and check_path is None:  # a remote store: check a local copy
                spool_path = check_path = self.spool_dir / f"code-{uuid.uuid4().hex}.check"
                spool = await self.io(open, spool_path, "wb")
            n = 0
            async for chunk in it:
                n += 1
                if chunk.WhichOneof("part") != "data":
                    raise _BadRequest(f"chunk {n}: only the first chunk carries a header; the rest carry data")
                await self.io(_write_both, writer, spool, chunk.data)
            await self.io(writer.verify)
            if record.kind == CODE:  # checked member by member before it is stored
                if spool is not None:
                    await self.io(spool.close)
                await self.io(check_archive, check_path)
            stored = await self.io(self.keeper.commit, writer, record)
        except _BadRequest as exc:
            error = (bad, str(exc))
        except IntegrityError as exc:
            error = (bad, f"{_what(record)}: {exc}; nothing was stored")
        except ArchiveError as exc:
            error = (bad, f"code archive: {exc}; nothing was stored")
        except NotFound as exc:
            error = (grpc.StatusCode.NOT_FOUND, f"header.artifact.experiment_id: {exc}")
        except ValueError as exc:  # the store refused the record, naming the field
            error = (bad, f"header.{exc}")
        except BlobGone as exc:
            error = (grpc.StatusCode.UNAVAILABLE, str(exc))
        except OSError as exc:
            if is_full(exc):
                log.warning("upload of %s refused: artifact store %s is full (%s)", _what(record), self.blobs.url, exc)
                error = (grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"{_what(record)}: artifact store full ({exc.strerror or exc}); nothing was stored")
            else:
                log.warning("upload of %s failed: artifact store %s: %s", _what(record), self.blobs.url, exc)
                error = (grpc.StatusCode.UNAVAILABLE, f"{_what(record)}: artifact store error: {exc}; "
                                                      f"nothing was stored")
        finally:
            # Before answering: once the client hears of a failure nothing of it is left.
            if writer is not None:
                await self.io(writer.abort)  # a no-op once committed
            if spool is not None:
                await self.io(_discard, spool, spool_path)
        if error is not None:
            if error[0] == bad:
                await bad_request(context, "Upload", error[1])
            await context.abort(*error)
        log.info("stored %s (%d bytes, sha256 %s)%s", _what(stored), stored.size, stored.sha256[:12],
                 " (blob already present)" if isinstance(writer, HashOnly) else "")
        return stored

    # ---------------------------------------------------------------- reads
    async def _resolve(self, ref: pb.ArtifactRef, context, method: str) -> Artifact:
        if ref.sha256:
            sha = ref.sha256.lower()
            if not is_digest(sha):
                await bad_request(context, method, f"ref.sha256: 64 hex digits, got {ref.sha256[:80]!r}")
            record = await self.db(self.store.find_artifact, sha)
            if record is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"ref.sha256: no artifact {sha} is stored")
            return record
        if not ref.name:
            await bad_request(context, method, "ref: give sha256, or experiment_id and name")
        try:
            return await self.db(self.store.get_artifact, ref.experiment_id, ref.name)
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def Stat(self, request: pb.ArtifactRef, context):
        record = await self._resolve(request, context, "Stat")
        # A record whose blob went (deleted outside trainctl) must not make a client skip its upload.
        if not await self.io(self.blobs.exists, record.sha256):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{_what(record)}: recorded but its blob "
                                                           f"{record.sha256[:12]} is missing from the store")
        return artifact_to_pb(record)

    async def Download(self, request: pb.ArtifactRef, context):
        record = await self._resolve(request, context, "Download")
        if request.offset < 0 or request.offset > record.size:
            await bad_request(context, "Download", f"ref.offset: 0..{record.size}, got {request.offset}")
        reader = self.blobs.read(record.sha256, request.offset)
        try:
            first = await self.io(next, reader, None)
        except BlobMissing:
            await context.abort(grpc.StatusCode.DATA_LOSS, f"{_what(record)}: its blob {record.sha256[:12]} "
                                                           f"is missing from the artifact store")
        yield pb.DownloadChunk(artifact=artifact_to_pb(record))
        try:
            block = first
            while block is not None:
                yield pb.DownloadChunk(data=block)
                block = await self.io(next, reader, None)
        finally:
            await self.io(reader.close)

    async def ListArtifacts(self, request: pb.ListArtifactsRequest, context):
        kind = pb.ArtifactKind.Name(request.kind) if request.kind in pb.ArtifactKind.values() else None
        if request.kind and kind is None:
            await bad_request(context, "ListArtifacts", f"kind: not an ArtifactKind, got {request.kind}")
        try:
            records = await self.db(self.store.list_artifacts, request.experiment_id,
                                    kind if request.kind else None)
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"experiment_id: {exc}")
        return pb.ListArtifactsResponse(artifacts=[artifact_to_pb(a) for a in records])

    async def CollectGarbage(self, request: pb.GcRequest, context):
        if self._role(context) == WORKER:
            await self._deny(context, "CollectGarbage needs a client token")
        report = await self.io(self.keeper.collect, request.dry_run)
        return pb.GcResponse(artifacts_removed=report.artifacts_removed, blobs_removed=report.blobs_removed,
                             bytes_freed=report.bytes_freed)


class _BadRequest(Exception):
    pass


def _write_both(writer, spool, data: bytes) -> None:
    writer.write(data)
    if spool is not None:
        spool.write(data)


def _discard(f, path: Path) -> None:
    try:
        f.close()
    except OSError:
        pass
    try:
        os.unlink(path)
    except OSError:
        pass


def _what(a: Artifact) -> str:
    if a.kind == CODE:
        return f"code archive {a.sha256[:12]}"
    return f"{a.kind.removeprefix('ARTIFACT_').lower()} {a.name!r} of experiment {a.experiment_id}"
