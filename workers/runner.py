"""Each run trains in its own process, forked from a preloaded forkserver.

Why a process and not a thread of the agent: the agent's gRPC side (the outbox sender,
gRPC's completion-queue thread, the receiver) takes the GIL tens to hundreds of times a
second, and every time it does, the training thread waits to get it back between two
torch ops. At a 5 ms step that cost ~10 % of throughput. In its own process the loop
has the GIL to itself and talks to the agent through one pipe, written by the training
thread itself (no helper thread): rows are batched in `BatchingSink` and sent at most every
`LINGER_S`; commands are read with a non-blocking poll at each step boundary.

The forkserver (shared with DDP's ranks) imports torch, timm and the engine once, so a
run's process starts in a fork, not ~5 s of imports. A run process that dies (segfault,
the kernel's OOM killer) fails that run with the reason; the agent goes on to the next.

Pipe messages, one pickled tuple each:
  run -> agent  ("rows", [(scope, step, epoch, wall_time, values), ...]), ("ack", Ack),
                ("progress", step), ("note", text), ("done", outcome, payload)
  agent -> run  ("control", Command), ("cancel", reason), ("ping",)
outcome is "completed" (payload: Summary.as_dict()), "cancelled" or "failed" (a reason).
"""
from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
import threading
import time
import traceback
from typing import Callable, Optional

from trainctl.workers.engine.context import STEP, Command, ControlInbox, TrainingContext

log = logging.getLogger(__name__)

LINGER_S = 0.02  # how long rows may wait in the run process before they are sent
# The agent pings its run process this often; a run process that has not heard from
# its agent for AGENT_SILENCE_S pauses at the next step until it does. A frozen or hung
# agent stops sending heartbeats, so the server will fence the attempt and start it
# elsewhere: by then this copy must not train on (and write checkpoints) unseen.
PING_S = 0.25
AGENT_SILENCE_S = 1.0

_PRELOAD = ["trainctl.workers.runner", "trainctl.workers.ddp", "trainctl.workers.engine.loop", "timm",
            "sklearn.datasets", "sklearn.model_selection"]


def forkserver():
    """The forkserver context runs and DDP ranks start from. Its server process imports
    torch, timm and the engine once; each run or rank is then a fork of it (no threads
    there, unlike the agent), which cuts a start from ~5-10 s of imports on a small box
    to a fork."""
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(_PRELOAD)  # only takes effect before the server first starts
    return mp


def warm_up() -> list[dict]:
    """Start the forkserver now (its imports take seconds, and the first run should not
    wait for them); returns this host's devices, asked of a fork of it."""
    mp = forkserver()
    here, there = mp.Pipe()
    # daemon: a worker refused by the server exits at once instead of waiting for it
    p = mp.Process(target=_report_devices, args=(there,), name="trainctl-devices", daemon=True)
    p.start()
    there.close()
    try:
        devices = here.recv()
    except EOFError:
        raise RuntimeError(f"the worker's forkserver failed to start: {_exit_text(p.exitcode)}") from None
    p.join()
    return devices


def _report_devices(conn) -> None:
    import os

    import torch

    if torch.cuda.is_available():
        devices = [{"kind": "cuda", "index": i, "name": torch.cuda.get_device_name(i),
                    "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                   for i in range(torch.cuda.device_count())]
    else:
        devices = [{"kind": "cpu", "index": 0, "name": f"{os.cpu_count()} cores"}]
    conn.send(devices)
    conn.close()


# ---------------------------------------------------------------------- in the agent


class ForwardingInbox(ControlInbox):
    """The agent's inbox for one run. A plain ControlInbox (what DDP's bridge reads) until
    a run process attaches; from then on a live command goes straight down the pipe, so
    no polling period is added to the control latency."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._send: Optional[Callable[[tuple], None]] = None
        self.fenced = False
        self.kill: Optional[Callable[[], None]] = None  # set by run_in_process once its process runs

    def fence(self, reason: str) -> None:
        """The server gave this attempt to someone else: stop it now, not at the next
        step boundary (an epoch end there would write a checkpoint of work that is no
        longer this attempt's to deliver). DDP ranks, which have no `kill`, are cancelled."""
        self.fenced = True
        self.cancel(reason)
        kill = self.kill
        if kill is not None:
            kill()

    def attach(self, send: Callable[[tuple], None]) -> list[Command]:
        """From now on forward live commands with `send`; returns what waited so far."""
        self._send = send
        return self.due(sys.maxsize)  # scheduled ones keep their at_step

    def put(self, command: Command) -> None:
        send = self._send
        if send is not None and command.at_step is None:
            send(("control", command))
        else:
            super().put(command)


def run_in_process(spec, ctx: TrainingContext, on_rows: Callable[[list[tuple]], None]):
    """Train `spec` in a fresh run process; returns its Summary, raises Cancelled or
    TrainingError like `Trainer.run`. `ctx.inbox` must be a ForwardingInbox; `on_rows`
    gets each batch of (scope, step, epoch, wall_time, values) rows as it arrives."""
    from trainctl.workers.engine.context import Cancelled, Summary, TrainingError

    mp = forkserver()
    here, there = mp.Pipe()
    lock = threading.Lock()

    def send(msg: tuple) -> None:
        with lock:  # the receiver thread forwards commands, this thread sends cancel
            try:
                here.send(msg)
            except OSError:
                pass  # the run process is gone; its exit is reported below

    waiting = ctx.inbox.attach(send)
    proc = mp.Process(target=_run_main, args=(there, spec.to_dict(), waiting, ctx.checkpoint_dir, ctx.lineage),
                      name="trainctl-run")
    proc.start()
    there.close()
    fenced = lambda: getattr(ctx.inbox, "fenced", False)  # noqa: E731
    if hasattr(ctx.inbox, "kill"):
        ctx.inbox.kill = proc.kill
    if fenced():  # fenced while it started
        proc.kill()
    cancel_sent = False
    outcome = None
    ended = False  # its end of the pipe closed: it exited or is dying
    pinged = 0.0
    try:
        while outcome is None and not fenced():
            if ctx.inbox.cancelled and not cancel_sent:  # set by SIGTERM or the server
                send(("cancel", ctx.inbox.cancel_reason))
                cancel_sent = True
            if time.monotonic() - pinged >= PING_S:
                pinged = time.monotonic()
                send(("ping",))
            if not here.poll(0.05):
                continue
            try:
                msg = here.recv()
            except (EOFError, OSError):  # OSError: reset, when it died with our pings unread
                ended = True
                break
            kind = msg[0]
            if fenced():
                break  # nothing more of it is delivered
            if kind == "rows":
                on_rows(msg[1])
            elif kind == "ack":
                ctx.inbox.ack(msg[1])
            elif kind == "progress":
                ctx.on_progress(msg[1])
            elif kind == "note":
                ctx.on_note(msg[1])
            elif kind == "done":
                outcome = msg[1:]
    finally:
        # Done or dying: let it exit (its exit code names the signal). Anything else is
        # an error on this side, leaving through here: do not leave it training.
        proc.join(10 if (outcome is not None or ended) and not fenced() else 0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if hasattr(ctx.inbox, "kill"):
            ctx.inbox.kill = None
        here.close()
    if fenced():
        raise Cancelled(ctx.inbox.cancel_reason)
    if outcome is None:
        raise TrainingError(f"the training process died: {_exit_text(proc.exitcode)}")
    kind, payload = outcome
    if kind == "completed":
        return Summary.from_dict(payload)
    if kind == "cancelled":
        raise Cancelled(payload)
    raise TrainingError(payload)


def _exit_text(code: Optional[int]) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (the kernel's out-of-memory killer sends this)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


# ---------------------------------------------------------------------- in the run process


class BatchingSink:
    """A MetricsSink for a process that trains: rows collect in a list and go to `send`
    as one ("rows", [...]) message once `LINGER_S` has passed (checked when a row comes),
    at an epoch row, or on flush. No thread: the training thread sends, ~50 times a
    second at most, so nothing else in the process wakes per step."""

    def __init__(self, send: Callable[[tuple], None]):
        self.send = send
        self.rows: list[tuple] = []
        self.sent_at = time.monotonic()

    def log(self, scope: str, step: int, epoch: int, values: dict[str, float]) -> None:
        self.rows.append((scope, step, epoch, time.time(), values))
        if scope != STEP or time.monotonic() - self.sent_at >= LINGER_S:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.send(("rows", self.rows))
            self.rows = []
        self.sent_at = time.monotonic()


class PipeInbox(ControlInbox):
    """The run process's ControlInbox: drains the pipe (a non-blocking poll, ~1 us) when
    the loop asks for due commands or whether it is cancelled, and pauses the loop while
    the agent is silent (see AGENT_SILENCE_S)."""

    def __init__(self, conn, **kwargs):
        super().__init__(**kwargs)
        self.conn = conn
        self.heard_at = time.monotonic()
        self.gone = False

    def _receive(self) -> None:
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                self.heard_at = time.monotonic()
                if msg[0] == "control":
                    super().put(msg[1])
                elif msg[0] == "cancel":
                    self.cancel(msg[1])
            if time.monotonic() - self.heard_at > AGENT_SILENCE_S:
                log.warning("the worker agent has been silent for %.1f s: training paused until it answers",
                            time.monotonic() - self.heard_at)
                self.conn.poll(None)  # returns on its next message, or at EOF if it died
                log.warning("the worker agent answered: training goes on")
                self._receive()
        except (EOFError, OSError):
            # The agent is gone (killed): stop rather than train on with nobody listening.
            self.gone = True
            self.cancel("the worker agent went away")

    def due(self, step: int) -> list[Command]:
        self._receive()
        return super().due(step)

    @property
    def cancelled(self) -> bool:
        if not super().cancelled:
            self._receive()
        return super().cancelled

    def orphaned(self) -> bool:
        if not self.gone:
            self._receive()
        return self.gone


def _send(conn, msg: tuple) -> None:
    try:
        conn.send(msg)
    except OSError:
        pass  # the agent is gone; the inbox notices and cancels at the next step


def tune_malloc() -> None:
    """Keep freed tensor memory in the heap instead of handing it back to the OS.

    glibc raises its mmap threshold only as it sees big blocks freed, so a long-lived
    process ends up reusing step buffers while a fresh run process returns them to the
    OS and faults them back in every step: ~2,500 page faults (10 MB) a step for
    resnet10t at batch 64, ~5 % of its step time. Fixing the thresholds at the values a
    warmed-up process reaches on its own (glibc's maximum, 32 MB, and twice that for
    trimming) makes a fresh process as fast from its first steps. glibc only."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


def _run_main(conn, spec_dict: dict, commands: list[Command], checkpoint_dir: Optional[str],
              lineage=None) -> None:
    from trainctl.spec import SpecError, parse_spec
    from trainctl.workers.engine.loop import Cancelled, Trainer, TrainingError

    tune_malloc()

    # Ctrl-C in a terminal reaches the whole process group: the agent decides (it cancels
    # or hands the run back); this process only follows.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    inbox = PipeInbox(conn, on_ack=lambda ack: _send(conn, ("ack", ack)))
    for cmd in commands:  # scheduled ones keep their at_step, live ones apply at once
        inbox.put(cmd)
    sink = BatchingSink(lambda msg: _send(conn, msg))
    ctx = TrainingContext(sink=sink, inbox=inbox, checkpoint_dir=checkpoint_dir, lineage=lineage,
                          on_progress=lambda step: _send(conn, ("progress", step)),
                          on_note=lambda text: _send(conn, ("note", text)))
    try:
        summary = Trainer(parse_spec(spec_dict, check_model=False), ctx).run()
        outcome = ("completed", summary.as_dict())
    except Cancelled as exc:
        outcome = ("cancelled", str(exc))
    except (TrainingError, SpecError, ValueError, FileNotFoundError) as exc:
        outcome = ("failed", str(exc))
    except Exception as exc:  # a bug or a runtime error (OOM, ...): still a clean FAILED
        log.error("run crashed:\n%s", traceback.format_exc())
        outcome = ("failed", failure_reason(exc))
    sink.flush()
    _send(conn, ("done", *outcome))
    conn.close()


def failure_reason(exc: BaseException) -> str:
    """One line a user can act on; out-of-memory (CUDA or host) is named as such."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    oom = type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower() \
        or "can't allocate memory" in text.lower()
    if oom:
        return f"out of memory: {text[:300]}"
    return f"{type(exc).__name__}: {text[:500]}"
