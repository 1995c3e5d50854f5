"""A CODE experiment on the worker: fetch the project archive, unpack it, run the command.

The archive is fetched once per sha256 into `<workdir>/code-cache/` and checked against
its sha256 at every use (a cached file damaged on disk is fetched again). Each attempt
unpacks into a fresh `<workdir>/<store>/exp-<id>/a<attempt>/src`, removed when the
attempt ends: the cache, not the tree, is what is worth keeping, and a command that
filled the disk gives its space back before the next run.

The command runs as `/bin/sh -c command` in its own process group (proc_group.py) with
the job's `env`, the SDK's wiring from the local endpoint (so `trainctl.init()` inside it
joins this experiment and attempt), and the worker's own interpreter first on PATH (so
`python` there has trainctl). Its exit decides the state, whatever the SDK reported:
0 -> COMPLETED; non-zero or a signal -> FAILED with the last lines of stderr. Cancel ->
SIGTERM to the group, `cancel_grace_s`, SIGKILL; fenced -> SIGKILL at once, nothing sent;
the worker stopping -> the group stopped as for a cancel and the run handed back (QUEUED).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Callable, Optional

import grpc

from trainctl.artifact_io import IntegrityError, download, sha256_file
from trainctl.transport import auth_metadata, open_channel
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.wire import dict_from_struct
from trainctl.workers.engine.checkpoint import checkpoint_dir
from trainctl.workers.proc_group import ProcessGroup, exit_text

log = logging.getLogger(__name__)

CACHE_DIR = "code-cache"
CACHE_KEEP = 16          # archives kept in the cache, least recently used dropped first
TAIL_LINES = 50          # last lines of each stream kept for a FAILED message
MESSAGE_CHARS = 4000     # of which at most this much goes into the message
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
INTEGRITY_TRIES = 3
_OOM_HINTS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")


class CodeError(Exception):
    """The run cannot start: its message is the FAILED state's."""


def is_code(a: pb.Assignment) -> bool:
    """A CODE assignment (a job spec, which names a command) rather than a spec run."""
    return bool(a.code_sha256) or "command" in a.spec.fields


class CodeInbox:
    """What the agent's receiver thread calls for the current code run: the same names as
    a spec run's inbox (put, cancel, fence), acted on by `run_code`'s wait loop. Live
    controls reach the command through the local endpoint, not through here."""

    def __init__(self):
        self.cancelled = False
        self.cancel_reason = ""
        self.fenced = False
        self.kill: Optional[Callable[[], None]] = None  # the process group's, once it runs
        self.wake = threading.Event()

    def put(self, command) -> None:  # a command without the SDK has nothing to apply it
        log.debug("control %s for a code run: left to its SDK", getattr(command, "command_id", command))

    def cancel(self, reason: str) -> None:
        if not self.cancelled:
            self.cancelled, self.cancel_reason = True, reason
        self.wake.set()

    def fence(self, reason: str) -> None:
        """Stop it now, from the receiver thread: it must not write one more checkpoint."""
        self.fenced = True
        self.cancel(reason)
        kill = self.kill
        if kill is not None:
            kill()


class CodeRun:
    """The agent's `current` while a command runs (the fields the agent reads of a spec
    run's `_Run`). `step` is what the command's SDK last reported (the local endpoint
    sets it; the heartbeats carry it): 0 for a command that never calls the SDK."""

    def __init__(self, a: pb.Assignment):
        self.experiment_id = a.experiment_id
        self.attempt = a.attempt
        self.inbox = CodeInbox()
        self.started = False
        self.notes: list[str] = []
        self.endpoint = None
        self.step = 0


# ---------------------------------------------------------------------- the archive


def fetch_archive(agent, sha256: str, inbox: CodeInbox) -> Optional[Path]:
    """The archive's path in the cache, fetched if missing or damaged; None when the run
    was cancelled while the server was unreachable. Raises CodeError."""
    cache = Path(agent.workdir) / CACHE_DIR
    path = cache / f"{sha256}.tar"
    if path.exists():
        if sha256_file(path)[0] == sha256:
            os.utime(path)  # recently used: the last to be evicted
            return path
        log.warning("cached code archive %s does not match its sha256: fetching it again", path)
        path.unlink(missing_ok=True)
    channel = open_channel(agent.server)
    try:
        stub = pb_grpc.ArtifactsStub(channel)
        delay, bad = 0.5, 0
        while True:
            try:
                started = time.monotonic()
                record = download(stub, pb.ArtifactRef(sha256=sha256), path, metadata=auth_metadata(agent.token))
                log.info("fetched code archive %s (%d bytes) in %.2f s", sha256[:12], record.size,
                         time.monotonic() - started)
                break
            except IntegrityError as exc:
                bad += 1
                if bad >= INTEGRITY_TRIES:
                    raise CodeError(f"code archive {sha256[:12]}: {exc}") from None
                log.warning("code archive %s arrived damaged (%s); fetching again", sha256[:12], exc)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise CodeError(f"code archive {sha256[:12]} is not in the server's artifact store") from None
                if exc.code() not in RETRY_CODES:
                    raise CodeError(f"could not fetch code archive {sha256[:12]}: {exc.code().name}: "
                                    f"{exc.details()}") from None
                log.warning("fetching code archive %s: %s; retrying in %.1f s", sha256[:12], exc.code().name, delay)
            if inbox.wake.wait(delay) and inbox.cancelled:
                return None
            delay = min(delay * 2, 5.0)
    finally:
        channel.close()
    _evict(cache, keep=CACHE_KEEP)
    return path


def _evict(cache: Path, keep: int) -> None:
    archives = sorted(cache.glob("*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in archives[keep:]:
        p.unlink(missing_ok=True)


def unpack(archive: Path, dest: Path) -> None:
    from trainctl.codepack import ArchiveError, safe_unpack

    if dest.exists():
        shutil.rmtree(dest)
    try:
        safe_unpack(archive, dest)
    except ArchiveError as exc:
        raise CodeError(f"code archive refused: {exc}") from None


# ---------------------------------------------------------------------- the command


def command_env(job_env: dict[str, str], sdk_env: dict[str, str]) -> dict[str, str]:
    """The worker's environment less its own TRAINCTL_* settings (its token, TLS, server:
    the command gets the local endpoint's instead), the worker's interpreter first on
    PATH, unbuffered Python output (lines reach the log as they are printed), then the
    job's variables and the SDK's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINCTL_")}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", os.defpath)])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(job_env)
    env.update(sdk_env)
    return env


def _endpoint(agent, a: pb.Assignment):
    """The local endpoint the command's SDK talks to (workers/local_endpoint.py), started."""
    from trainctl.workers.local_endpoint import LocalEndpoint

    return LocalEndpoint(agent, a).start()


class _Output:
    """Each line to the agent's log shipper and the last lines of each
    stream kept here for a FAILED message. Called from the two reader threads."""

    def __init__(self, agent, a: pb.Assignment):
        self.shipper = agent.logs
        self.ids = (a.experiment_id, a.attempt)
        self.stdout: deque[str] = deque(maxlen=TAIL_LINES)
        self.stderr: deque[str] = deque(maxlen=TAIL_LINES)

    def _ship(self, stream: int, text: str) -> None:
        self.shipper.add(*self.ids, stream, text)

    def out(self, text: str) -> None:
        self.stdout.append(text)
        self._ship(pb.STDOUT, text)

    def err(self, text: str) -> None:
        self.stderr.append(text)
        self._ship(pb.STDERR, text)

    def system(self, text: str) -> None:
        self._ship(pb.SYSTEM, text)

    def tail(self) -> str:
        lines = list(self.stderr) or list(self.stdout)
        text = "\n".join(lines)
        return text if len(text) <= MESSAGE_CHARS else "..." + text[-MESSAGE_CHARS:]


def failure_message(how: str, tail: str, memory_gb: Optional[float]) -> str:
    if memory_gb and (how.startswith("killed by") or any(h in tail for h in _OOM_HINTS)):
        how += f" (its address space is capped at {memory_gb:g} GB by resources.memory_gb)"
    return f"{how}: {tail}" if tail else how


def _stop(group: ProcessGroup, inbox: CodeInbox, grace: float, out: _Output) -> None:
    """Cancel or worker stop: SIGTERM to the group, `grace` seconds, then SIGKILL."""
    out.system(f"stopping: SIGTERM to the process group ({inbox.cancel_reason}); SIGKILL after {grace:g} s")
    group.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while not group.exited() and time.monotonic() < deadline and not inbox.fenced:
        time.sleep(0.05)
    if not group.exited():
        out.system("still running after the grace period: SIGKILL")
    group.kill()


def run_code(agent, a: pb.Assignment) -> None:
    """Run one CODE assignment to its end and send its final state (none when fenced).
    Called on the agent's main thread in place of the spec path of `Agent._train`."""
    from trainctl.jobspec import SHA256_RE, parse_job
    from trainctl.spec import SpecError

    run = CodeRun(a)
    inbox = run.inbox
    agent.current = run
    ids = f"experiment {a.experiment_id} attempt {a.attempt}"
    attempt_dir = checkpoint_dir(agent.workdir, a.store_id, a.experiment_id) / f"a{a.attempt}"
    out = _Output(agent, a)
    rc: Optional[int] = None
    stopped = True  # by a cancel or the worker stopping; False once the command ended on its own
    memory_gb = None
    group: Optional[ProcessGroup] = None
    try:
        job = parse_job(dict_from_struct(a.spec))
        memory_gb = job.resources.memory_gb
        sha256 = a.code_sha256 or job.code_sha256 or ""
        if sha256 and not SHA256_RE.match(sha256):  # it names a file in the cache
            raise CodeError(f"code_sha256: not a sha256: {sha256[:80]!r}")
        log.info("%s started: %r, command %r (code %s)", ids, a.name, job.command, sha256[:12] or "none")
        # No archive (a job submitted without --code): the command runs in an empty folder.
        archive = fetch_archive(agent, sha256, inbox) if sha256 else None
        if (archive is not None or not sha256) and not inbox.cancelled:
            src = attempt_dir / "src"
            if archive is not None:
                unpack(archive, src)
            else:
                src.mkdir(parents=True, exist_ok=True)
            run.endpoint = agent.endpoint = _endpoint(agent, a)  # the agent relays this run's controls to it
            out.system(f"$ {job.command}")
            group = ProcessGroup(job.command, cwd=str(src), env=command_env(job.env, run.endpoint.env()),
                                 memory_bytes=int(memory_gb * 2**30) if memory_gb else None,
                                 on_stdout=out.out, on_stderr=out.err)
            inbox.kill = group.kill
            if inbox.fenced:  # fenced while it started
                group.kill()
            run.started = True
            agent._state(run, pb.RUNNING)
            stopped = False
            while not group.exited():
                if inbox.cancelled and not inbox.fenced:
                    _stop(group, inbox, job.cancel_grace_s, out)
                    stopped = True
                    break
                inbox.wake.wait(0.1)
            rc = group.reap()
            inbox.kill = None
            out.system(f"ended: {exit_text(rc)}")
        _report(agent, run, rc, stopped, out, memory_gb, ids)
    except (CodeError, SpecError) as exc:
        _fail(agent, run, str(exc), ids)
    except OSError as exc:  # a full disk while fetching or unpacking, ...: this run fails, the worker goes on
        _fail(agent, run, f"could not prepare the code: {exc}", ids)
    except Exception as exc:  # a bug: still a clean FAILED
        log.error("%s crashed:\n%s", ids, traceback.format_exc())
        _fail(agent, run, f"{type(exc).__name__}: {exc}", ids)
    finally:
        if group is not None and group.returncode is None:  # left through an error: leave nothing running
            group.kill()
            group.reap()
        agent.current = agent.endpoint = None
        if run.endpoint is not None:
            run.endpoint.stop()
        shutil.rmtree(attempt_dir, ignore_errors=True)


def _fail(agent, run: CodeRun, message: str, ids: str) -> None:
    if run.inbox.fenced:
        log.warning("%s fenced", ids)
        return
    log.warning("%s failed: %s", ids, message)
    agent._state(run, pb.FAILED, message=message)


def _report(agent, run: CodeRun, rc: Optional[int], stopped: bool, out: _Output, memory_gb: Optional[float],
            ids: str) -> None:
    """The final state. A command that ended on its own is judged by its exit status even
    when a cancel came in just after (the cancel found nothing left to stop)."""
    inbox = run.inbox
    if inbox.fenced:  # its processes are gone; the server gave the run to another
        log.warning("%s fenced: its process group killed, unsent data dropped", ids)
    elif not stopped:
        _judge(agent, run, rc, out, memory_gb, ids)
    elif agent.stopping.is_set():  # SIGTERM to the worker: the run resumes elsewhere
        agent._state(run, pb.QUEUED, message=f"worker {agent.worker_id} stopped; handed back")
        log.info("%s handed back: worker stopping", ids)
    else:
        agent._state(run, pb.CANCELLED, message=inbox.cancel_reason)
        log.info("%s cancelled: %s (%s)", ids, inbox.cancel_reason, "not started" if rc is None else exit_text(rc))


def _judge(agent, run: CodeRun, rc: int, out: _Output, memory_gb: Optional[float], ids: str) -> None:
    if rc == 0:
        final = run.endpoint.final_state
        summary = dict(final.summary) if final is not None and final.summary else None
        agent._state(run, pb.COMPLETED, summary=summary)
        log.info("%s completed", ids)
    else:
        message = failure_message(exit_text(rc), out.tail(), memory_gb)
        log.warning("%s failed: %s", ids, message.splitlines()[0])
        agent._state(run, pb.FAILED, message=message)
