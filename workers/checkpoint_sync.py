"""Spec runs' checkpoints through the server's artifact store, so a run resumes on
another box (issue 13 item 6).

Two halves, both in the agent process (never the run process: an upload must not
share a GIL with the loop, and the loop never waits for the network):

- `fetch`: before a run starts, the assignment's `checkpoint` (the newest one the
  server has within the steps it holds) is downloaded into the run's checkpoint
  directory when that directory lacks it. The local directory stays the fast path:
  a file already there under that name and size is used as is. A downloaded file is
  only put where a local one would be; `load_for_resume` then applies the same
  lineage checks (store, experiment, delivered steps) to both.
- `upload`: each checkpoint file the engine reports complete (a `Checkpointed`
  message from the run process) is queued and sent by one background thread as
  ARTIFACT_CHECKPOINT `ckpt-<step>-a<attempt>.pt`. Re-sending a name is harmless (the
  store replaces the record with the same bytes). Transient errors are retried with
  backoff; a refusal (the lease is gone: fenced, or the run ended) drops the item.
  The agent `drain`s the queue before it reports a final state or hands a run back,
  while its lease still allows the upload, and `forget`s a fenced attempt's items.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import grpc

from trainctl import artifact_io
from trainctl.transport import auth_metadata, open_channel
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.workers.engine.checkpoint import NAME_RE, checkpoint_name

log = logging.getLogger(__name__)

# Worth another try: the server or the network, not the request.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED}
UPLOAD_TRIES = 6
FETCH_TRIES = 3
TRANSFER_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Pending:
    experiment_id: int
    attempt: int
    path: Path
    step: int


class CheckpointSync:
    """One per agent. `fetch` runs on the caller's thread; uploads on a daemon thread
    started on first use."""

    def __init__(self, server: str, token: Optional[str] = None, *, worker_id: str = "",
                 channel_factory: Callable[[str], grpc.Channel] = open_channel, backoff_s: float = 0.5):
        self._server = server
        # The worker names its Connect session: the server lets a checkpoint in only from
        # the session that holds that run's lease at that attempt.
        self._metadata = (*(auth_metadata(token) or ()), (artifact_io.WORKER_ID_METADATA, worker_id))
        self._channel_factory = channel_factory
        self._backoff_s = backoff_s
        self._stub = None
        self._lock = threading.Condition()
        self._queue: deque[Pending] = deque()
        self._busy: Optional[Pending] = None
        self._forgotten: set[tuple[int, int]] = set()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.uploaded: deque[pb.Artifact] = deque(maxlen=100)  # the last ones the store confirmed

    def _artifacts(self):
        if self._stub is None:
            self._stub = pb_grpc.ArtifactsStub(self._channel_factory(self._server))
        return self._stub

    # ------------------------------------------------------------------ fetch
    def fetch(self, a: pb.Assignment, directory: Path, note: Callable[[str], None]) -> Optional[Path]:
        """Put the assignment's checkpoint into `directory` unless it is there already.
        Returns its path, or None (no checkpoint offered, refused, or not fetched: the
        run then resumes from what the directory has, or from scratch). Never raises:
        without the file a run still starts, only from an older point."""
        if not a.HasField("checkpoint") or not a.checkpoint.name:
            return None
        try:
            return self._fetch(a, directory, note)
        except Exception as exc:  # a bug here must not take the worker down with it
            log.exception("fetching checkpoint %s failed", a.checkpoint.name)
            note(f"checkpoint {a.checkpoint.name[:80]} could not be fetched ({type(exc).__name__}: {exc})")
            return None

    def _fetch(self, a: pb.Assignment, directory: Path, note: Callable[[str], None]) -> Optional[Path]:
        ck = a.checkpoint
        # Only the engine's own file names (NAME_RE) go on disk: anything else would never
        # be resumed, and a name is a path component.
        if not NAME_RE.match(ck.name) or (ck.experiment_id and ck.experiment_id != a.experiment_id):
            note(f"checkpoint {ck.name[:80]!r} of experiment {ck.experiment_id} offered by the server not used: "
                 f"not a checkpoint of this experiment")
            return None
        dest = Path(directory) / ck.name
        if dest.is_file() and dest.stat().st_size == ck.size:
            return dest  # the fast path: this box wrote (or fetched) it already
        ref = pb.ArtifactRef(sha256=ck.sha256) if ck.sha256 else pb.ArtifactRef(experiment_id=a.experiment_id,
                                                                                 name=ck.name)
        started = time.monotonic()
        for tries in range(1, FETCH_TRIES + 1):
            try:
                artifact_io.download(self._artifacts(), ref, dest, metadata=self._metadata,
                                     timeout=TRANSFER_TIMEOUT_S)
                break
            except grpc.RpcError as exc:
                if exc.code() not in _TRANSIENT or tries == FETCH_TRIES:
                    note(f"checkpoint {ck.name} could not be fetched from the artifact store "
                         f"({exc.code().name}: {exc.details()})")
                    return None
            except artifact_io.IntegrityError as exc:  # a torn transfer or a bad blob: never resumed
                if tries == FETCH_TRIES:
                    note(f"checkpoint {ck.name} from the artifact store is damaged ({exc}); not used")
                    return None
            except OSError as exc:  # our disk (full, read-only): the run may still start from scratch
                note(f"checkpoint {ck.name} could not be written to {directory} ({exc})")
                return None
            time.sleep(self._backoff_s * tries)
        note(f"checkpoint {ck.name} fetched from the artifact store ({ck.size} bytes, "
             f"{time.monotonic() - started:.1f} s)")
        return dest

    # ------------------------------------------------------------------ upload
    def upload(self, experiment_id: int, attempt: int, path: str | Path, step: int) -> None:
        """Queue a complete checkpoint file for upload; returns at once."""
        with self._lock:
            if self._closed or (experiment_id, attempt) in self._forgotten:
                return
            self._queue.append(Pending(experiment_id, attempt, Path(path), int(step)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._pump, name="checkpoint-upload", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def forget(self, experiment_id: int, attempt: int) -> None:
        """A fenced attempt: nothing more of it is sent (the server would refuse it)."""
        with self._lock:
            self._forgotten.add((experiment_id, attempt))
            self._queue = deque(p for p in self._queue if (p.experiment_id, p.attempt) != (experiment_id, attempt))
            self._lock.notify_all()

    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + (self._busy is not None)

    def drain(self, timeout: float) -> bool:
        """Wait until every queued upload is done (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._busy is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.2))
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._lock.notify_all()

    def _pump(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                item = self._busy = self._queue.popleft()
            try:
                self._send(item)
            except Exception:  # a bug here must not end the thread (the next upload still goes)
                log.exception("checkpoint upload of %s failed", item.path)
            finally:
                with self._lock:
                    self._busy = None
                    self._lock.notify_all()

    def _send(self, item: Pending) -> None:
        art = pb.Artifact(experiment_id=item.experiment_id, attempt=item.attempt, kind=pb.ARTIFACT_CHECKPOINT,
                          name=checkpoint_name(item.step, item.attempt), step=item.step)
        for tries in range(1, UPLOAD_TRIES + 1):
            with self._lock:
                if (item.experiment_id, item.attempt) in self._forgotten or self._closed:
                    return
            try:
                started = time.monotonic()
                got = artifact_io.upload(self._artifacts(), item.path, art, metadata=self._metadata,
                                         timeout=TRANSFER_TIMEOUT_S)
                self.uploaded.append(got)
                log.info("experiment %d attempt %d: checkpoint %s uploaded (%d bytes, %.2f s)", item.experiment_id,
                         item.attempt, art.name, got.size, time.monotonic() - started)
                return
            except FileNotFoundError:  # pruned meanwhile: a newer one is queued behind it
                log.info("checkpoint %s gone before its upload (pruned); skipped", item.path.name)
                return
            except grpc.RpcError as exc:
                if exc.code() not in _TRANSIENT:  # PERMISSION_DENIED: the lease is gone; others: ours
                    log.warning("experiment %d attempt %d: checkpoint %s not uploaded: %s: %s", item.experiment_id,
                                item.attempt, art.name, exc.code().name, exc.details())
                    return
                if tries == UPLOAD_TRIES:
                    log.warning("experiment %d attempt %d: checkpoint %s not uploaded after %d tries: %s",
                                item.experiment_id, item.attempt, art.name, tries, exc.code().name)
                    return
            except OSError as exc:  # unreadable file
                log.warning("checkpoint %s not uploaded: %s", item.path, exc)
                return
            with self._lock:  # back off, but wake for forget/close
                self._lock.wait(self._backoff_s * 2 ** (tries - 1))
