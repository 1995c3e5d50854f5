"""A run's files and checkpoints through the server's artifact store: `run.save`,
`run.save_checkpoint`, `run.load_checkpoint` (thin methods on Run, run.py).

The loop pays only for the local part: `save` copies the file (or serializes the
object) into a staging file at once, since the loop may overwrite it next; a background
thread uploads it (trainctl/artifact_io.py), retrying network errors with backoff, so
an unreachable server never raises into the loop. `finish` waits for what is pending,
within the run's finish timeout, and names what did not make it.

Who uploads: an attached run's SDK goes straight to the server with its run token
(UploadHeader.run_token); inside a submitted command the same calls reach the worker's
local endpoint (workers/local_endpoint.py), which forwards them with the worker's
credentials. A checkpoint holds `{"trainctl_run": run.state_dict(), "user": obj}`, is
named `ckpt-<step>-a<attempt>.pt` (step: the steps done, 0..step-1) and is also kept in
`run.checkpoint_dir`, so a restart on the same box need not download it.
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import grpc

from trainctl import artifact_io
from trainctl.attach.run import _at_step
from trainctl.transport import auth_metadata, open_channel
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

log = logging.getLogger("trainctl.attach")

KEEP_LOCAL = 2             # checkpoints this run keeps in checkpoint_dir once uploaded
ROWS_FIRST_S = 5.0         # the longest a checkpoint upload waits for the rows before it
MAX_NAME = 255
_GIVE_UP = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED,
            grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE}
_PAYLOAD = "trainctl_run"


def _dump(obj: Any, path: Path) -> None:
    try:
        import torch
    except ImportError:  # a loop without torch: plain pickle
        import pickle
        with open(path, "wb") as f:
            pickle.dump(obj, f)
        return
    torch.save(obj, path)


def _load(path: Path, map_location=None) -> Any:
    try:
        import torch
    except ImportError:
        import pickle
        with open(path, "rb") as f:
            return pickle.load(f)
    # weights_only=False: the payload is the user's own objects, written by this
    # experiment's lineage (the server hands a run only its own experiment's checkpoints).
    return torch.load(path, map_location=map_location, weights_only=False)


@dataclass
class _Job:
    path: Path
    name: str
    kind: int
    step: int
    staged: bool          # a copy made for the upload: removed once uploaded
    tries: int = 0


class Files:
    def __init__(self, run):
        self.run = run
        self._jobs: "deque[_Job]" = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._channel: Optional[grpc.Channel] = None
        self._call = None                       # the upload in flight (cancelled by a finish that timed out)
        self._stage_dir: Optional[Path] = None
        self._serial = itertools.count()        # staged files' names
        self._ckpt_dir: Optional[Path] = None
        self._local_ckpts: list[Path] = []      # uploaded checkpoints this run wrote, oldest first
        self.uploaded: list[pb.Artifact] = []
        self.failed: list[str] = []

    # ------------------------------------------------------------------ where
    @property
    def checkpoint_dir(self) -> Path:
        if self._ckpt_dir is None:
            env = os.environ.get("TRAINCTL_CHECKPOINT_DIR")
            d = Path(env) if env else Path(tempfile.mkdtemp(prefix="trainctl-ckpt-"))
            d.mkdir(parents=True, exist_ok=True)
            self._ckpt_dir = d
        return self._ckpt_dir

    def _staging(self) -> Path:
        if self._stage_dir is None:
            self._stage_dir = Path(tempfile.mkdtemp(prefix="trainctl-save-"))
        return self._stage_dir

    def attempt(self) -> int:
        return int(getattr(self.run._session, "attempt", 0) or os.environ.get("TRAINCTL_ATTEMPT") or 1)

    # ------------------------------------------------------------------ the loop's side
    def save(self, path_or_obj: Any, name: Optional[str] = None) -> str:
        """Queue a file (a path) or an object (serialized now with torch.save) for upload as
        ARTIFACT_FILE `name` (default: the file's name). Returns the name."""
        if isinstance(path_or_obj, (str, os.PathLike)):
            src = Path(path_or_obj)
            if not src.is_file():
                raise ValueError(f"path_or_obj: {str(src)!r} is not a file")
            name = _check_name(name if name is not None else src.name)
            if self.run.rank != 0:
                return name
            staged = self._staging() / f"{next(self._serial)}-{src.name}"
            shutil.copyfile(src, staged)  # the loop may write the file again before it is sent
        else:
            if name is None:
                raise ValueError("name: required when saving an object (e.g. run.save(obj, 'model.pt'))")
            name = _check_name(name)
            if self.run.rank != 0:
                return name
            staged = self._staging() / f"{next(self._serial)}-obj"
            _dump(path_or_obj, staged)
        self._queue(_Job(staged, name, pb.ARTIFACT_FILE, self.run.step_count, staged=True))
        return name

    def save_checkpoint(self, obj: Any = None) -> str:
        """`obj` and the run's steering state as checkpoint `ckpt-<step>-a<attempt>.pt`, where
        step counts the steps done (call it after a step's work). Returns the name."""
        run = self.run
        step = run._step + 1 if run._started else 0
        name = f"ckpt-{step}-a{self.attempt()}.pt"
        if run.rank != 0:
            return name
        run._seal_row()
        run._session.pump()  # its rows on their way first (see _rows_first)
        path = self.checkpoint_dir / name
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        try:
            _dump({_PAYLOAD: run.state_dict(), "user": obj}, tmp)
            os.replace(tmp, path)  # never a torn file under the final name
        finally:
            tmp.unlink(missing_ok=True)
        self._queue(_Job(path, name, pb.ARTIFACT_CHECKPOINT, step, staged=False))
        return name

    def _queue(self, job: _Job) -> None:
        with self._lock:
            self._jobs.append(job)
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._upload_forever, name="trainctl-files", daemon=True)
                self._thread.start()
        self._wake.set()

    # ------------------------------------------------------------------ resuming
    def load_checkpoint(self, map_location=None, timeout: float = 120.0) -> Any:
        """The assignment's checkpoint (TRAINCTL_CHECKPOINT_*, set by the worker for a
        restarted submitted command): the run's steering state and step are restored from
        it and the saved object is returned. None when there is none, or when it could not
        be fetched within `timeout` (a warning says why; the run then starts over)."""
        name = os.environ.get("TRAINCTL_CHECKPOINT_NAME")
        sha = os.environ.get("TRAINCTL_CHECKPOINT_SHA256", "")
        exp_id = int(os.environ.get("TRAINCTL_EXPERIMENT_ID") or 0)
        if not name or not exp_id or "/" in name or name.startswith("."):
            return None
        path = self.checkpoint_dir / name
        if not (path.is_file() and artifact_io.sha256_file(path)[0] == sha):
            if not self._download(exp_id, name, path, time.monotonic() + timeout):
                return None
        payload = _load(path, map_location)
        if not isinstance(payload, dict) or _PAYLOAD not in payload:
            log.warning("trainctl: checkpoint %s was not written by run.save_checkpoint; not resumed", name)
            return None
        state = payload[_PAYLOAD]
        self._drop_replayed_before(int(state.get("step", 0)) + (1 if state.get("started") else 0))
        self.run.load_state_dict(state)
        log.info("trainctl: resumed from checkpoint %s (step %d)", name, self.run.step_count)
        return payload.get("user")

    def _download(self, exp_id: int, name: str, path: Path, deadline: float) -> bool:
        channel = open_channel(self.run.server)
        delay = 0.2
        try:
            stub = pb_grpc.ArtifactsStub(channel)
            while True:
                try:
                    artifact_io.download(stub, pb.ArtifactRef(experiment_id=exp_id, name=name), path,
                                         metadata=auth_metadata(getattr(self.run._session, "token", None)
                                                                or os.environ.get("TRAINCTL_TOKEN")),
                                         timeout=max(1.0, deadline - time.monotonic()))
                    return True
                except artifact_io.IntegrityError as exc:
                    why = str(exc)
                except grpc.RpcError as exc:
                    why = f"{exc.code().name}: {exc.details()}"
                    if exc.code() in _GIVE_UP:
                        deadline = 0
                if time.monotonic() + delay > deadline:
                    log.warning("trainctl: could not fetch checkpoint %s (%s); starting without it", name, why)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            channel.close()

    def _drop_replayed_before(self, next_step: int) -> None:
        """Commands re-sent for a restart (applied in an earlier attempt, or scheduled)
        whose step precedes the checkpoint's end are inside its steering state already:
        applying them again would apply them twice. They come with the Attach answer,
        which the local endpoint gives in milliseconds: wait for it first."""
        run = self.run
        run._session.wait_attached(10.0)
        for q in (run._due, run._incoming):
            keep = [c for c in q if not (isinstance(c, pb.ControlRecord) and _at_step(c) < next_step)]
            q.clear()
            q.extend(keep)
        run._waiting = [c for c in run._waiting if _at_step(c) >= next_step]
        run._next_replayed = min((_at_step(c) for c in run._waiting), default=float("inf"))

    # ------------------------------------------------------------------ the uploader
    def _upload_forever(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            with self._lock:
                job = self._jobs[0] if self._jobs else None
                if job is None:
                    self._idle.set()
            if job is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            session = self.run._session
            if not session.experiment_id or session.attached is None:
                if session.gave_up:
                    self._drop(job, session.gave_up)
                else:
                    self._stop.wait(0.1)  # registered soon (Attach is retried in the background)
                continue
            try:
                if job.kind == pb.ARTIFACT_CHECKPOINT and job.tries == 0:
                    _rows_first(session.outbox, self._stop)
                self._upload(job, session)
                delay = 0.2
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                if exc.code() in _GIVE_UP:
                    self._drop(job, f"{exc.code().name}: {exc.details()}")
                else:
                    job.tries += 1
                    (log.warning if job.tries == 1 else log.debug)(
                        "trainctl: uploading %s: %s; retrying in the background", job.name, exc.code().name)
                    self._stop.wait(delay)
                    delay = min(delay * 2, 10.0)
            except OSError as exc:  # the staged file vanished, a full disk...
                self._drop(job, str(exc))
            except Exception as exc:  # never let the thread die
                log.exception("trainctl: uploading %s failed", job.name)
                self._drop(job, f"{type(exc).__name__}: {exc}")

    def _upload(self, job: _Job, session) -> None:
        if self._channel is None:
            self._channel = open_channel(self.run.server)
        art = pb.Artifact(experiment_id=session.experiment_id, attempt=session.attempt, name=job.name,
                          kind=job.kind, step=job.step)
        art.sha256, art.size = artifact_io.sha256_file(job.path)
        header = pb.UploadHeader(artifact=art, run_token=session.attached.run_token)
        call = pb_grpc.ArtifactsStub(self._channel).Upload.future(
            artifact_io.upload_chunks(job.path, header), metadata=auth_metadata(session.token))
        self._call = call
        try:
            record = call.result()
        finally:
            self._call = None
        with self._lock:
            if self._jobs and self._jobs[0] is job:  # (a finish that gave up has cleared them)
                self._jobs.popleft()
        self.uploaded.append(record)
        if job.staged:
            job.path.unlink(missing_ok=True)
        elif job.kind == pb.ARTIFACT_CHECKPOINT:
            self._local_ckpts.append(job.path)
            for old in self._local_ckpts[:-KEEP_LOCAL]:  # the server has them; this box keeps the newest
                old.unlink(missing_ok=True)
            del self._local_ckpts[:-KEEP_LOCAL]

    def _drop(self, job: _Job, why: str) -> None:
        with self._lock:
            if self._jobs and self._jobs[0] is job:
                self._jobs.popleft()
        where = "" if job.staged else f"; the file is kept at {job.path}"
        if job.staged:
            job.path.unlink(missing_ok=True)
        self.failed.append(f"artifact {job.name!r} was not uploaded ({why}){where}")
        log.warning("trainctl: %s", self.failed[-1])

    # ------------------------------------------------------------------ the end
    def finish(self, deadline: float) -> list[str]:
        """Wait (until `deadline`, monotonic) for the queued uploads; stop the uploader.
        Returns a line per artifact that did not make it."""
        self._wake.set()
        while not self._idle.is_set() and time.monotonic() < deadline:
            self._idle.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        with self._lock:
            left = list(self._jobs)
            self._jobs.clear()
        for job in left:
            keep = f"; kept at {job.path}" if not job.staged else ""
            self.failed.append(f"artifact {job.name!r} was not uploaded (server {self.run.server} "
                               f"unreachable){keep}")
            if job.staged:
                job.path.unlink(missing_ok=True)
        if self._stage_dir is not None:
            shutil.rmtree(self._stage_dir, ignore_errors=True)
        if self._channel is not None:
            self._channel.close()
        return list(self.failed)


def _rows_first(outbox, stop: threading.Event) -> None:
    """Give the rows before a checkpoint a moment to be acknowledged first: the server
    resumes a run only from a checkpoint whose steps it holds (Assignment.checkpoint), so
    a checkpoint stored ahead of its rows is not yet one a restart can use. Bounded: a
    busy loop keeps rows in flight, and then the checkpoint goes anyway."""
    deadline = time.monotonic() + ROWS_FIRST_S
    while outbox.pending() and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.02)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise ValueError(f"name: {str(name)[:80]!r}: 1..{MAX_NAME} printable characters")
    return name
