"""Each run trains in its own process, forked from a preloaded forkserver: the agent side.

Why a process and not a thread of the agent: the agent's gRPC side (the outbox sender,
gRPC's completion-queue thread, the receiver) takes the GIL tens to hundreds of times a
second, and every time it does, the training thread waits to get it back between two
torch ops. At a 5 ms step that cost ~10 % of throughput. In its own process the loop
has the GIL to itself and talks to the agent through one pipe (workers/run_process.py
is the other end; the messages are the types in workers/pipe.py).

The forkserver (shared with DDP's ranks) imports torch, timm and the engine once, so a
run's process starts in a fork, not ~5 s of imports. A run process that dies (segfault,
the kernel's OOM killer) fails that run with the reason; the agent goes on to the next.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

from trainctl.workers.engine.context import Command, ControlInbox, TrainingContext
from trainctl.workers.pipe import PING_S, Cancel, Control, Done, Ping, Row, ToRun, relay
from trainctl.workers.run_process import report_devices, run_main

log = logging.getLogger(__name__)

_PRELOAD = ["trainctl.workers.runner", "trainctl.workers.run_process", "trainctl.workers.ddp",
            "trainctl.workers.engine.loop"]
# What spec runs import besides torch (~5 s of CPU on a small box). A worker that only runs
# submitted commands (their own processes, not forks) can leave them to the first spec
# run that needs them: TRAINCTL_PRELOAD="" (or another comma-separated list of modules).
PRELOAD_ENV, SPEC_RUN_MODULES = "TRAINCTL_PRELOAD", "timm,sklearn.datasets,sklearn.model_selection"


def preload_modules() -> list[str]:
    extra = os.environ.get(PRELOAD_ENV, SPEC_RUN_MODULES)
    return _PRELOAD + [m.strip() for m in extra.split(",") if m.strip()]


def forkserver():
    """The forkserver context runs and DDP ranks start from. Its server process imports
    torch, the engine and `preload_modules()` once; each run or rank is then a fork of it (no threads
    there, unlike the agent), which cuts a start from ~5-10 s of imports on a small box
    to a fork."""
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(preload_modules())  # only takes effect before the server first starts
    return mp


def warm_up() -> list[dict]:
    """Start the forkserver now (its imports take seconds, and the first run should not
    wait for them); returns this host's devices, asked of a fork of it."""
    mp = forkserver()
    here, there = mp.Pipe()
    # daemon: a worker refused by the server exits at once instead of waiting for it
    p = mp.Process(target=report_devices, args=(there,), name="trainctl-devices", daemon=True)
    p.start()
    there.close()
    try:
        devices = here.recv()
    except EOFError:
        raise RuntimeError(f"the worker's forkserver failed to start: {_exit_text(p.exitcode)}") from None
    p.join()
    return devices


# ---------------------------------------------------------------------- in the agent


class ForwardingInbox(ControlInbox):
    """The agent's inbox for one run. A plain ControlInbox (what DDP's bridge reads) until
    a run process attaches; from then on a live command goes straight down the pipe, so
    no polling period is added to the control latency."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._send: Optional[Callable[[ToRun], None]] = None
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

    def attach(self, send: Callable[[ToRun], None]) -> list[Command]:
        """From now on forward live commands with `send`; returns what waited so far."""
        self._send = send
        return self.due(sys.maxsize)  # scheduled ones keep their at_step

    def put(self, command: Command) -> None:
        send = self._send
        if send is not None and command.at_step is None:
            send(Control(command))
        else:
            super().put(command)


def run_in_process(spec, ctx: TrainingContext, on_rows: Callable[[list[Row]], None]):
    """Train `spec` in a fresh run process; returns its Summary, raises Cancelled or
    TrainingError like `Trainer.run`. `ctx.inbox` must be a ForwardingInbox; `on_rows`
    gets each batch of (scope, step, epoch, wall_time, values) rows as it arrives."""
    from trainctl.workers.engine.context import Cancelled, Summary, TrainingError

    mp = forkserver()
    here, there = mp.Pipe()
    lock = threading.Lock()

    def send(msg: ToRun) -> None:
        with lock:  # the receiver thread forwards commands, this thread sends cancel
            try:
                here.send(msg)
            except OSError:
                pass  # the run process is gone; its exit is reported below

    inbox: ForwardingInbox = ctx.inbox
    waiting = inbox.attach(send)
    proc = mp.Process(target=run_main, args=(there, spec.to_dict(), waiting, ctx.checkpoint_dir, ctx.lineage),
                      name="trainctl-run")
    proc.start()
    there.close()
    inbox.kill = proc.kill
    if inbox.fenced:  # fenced while it started
        proc.kill()
    cancel_sent = False
    outcome = None
    ended = False  # its end of the pipe closed: it exited or is dying
    pinged = 0.0
    try:
        while outcome is None and not inbox.fenced:
            if inbox.cancelled and not cancel_sent:  # set by SIGTERM or the server
                send(Cancel(inbox.cancel_reason))
                cancel_sent = True
            if time.monotonic() - pinged >= PING_S:
                pinged = time.monotonic()
                send(Ping())
            if not here.poll(0.05):
                continue
            try:
                msg = here.recv()
            except (EOFError, OSError):  # OSError: reset, when it died with our pings unread
                ended = True
                break
            if inbox.fenced:
                break  # nothing more of it is delivered
            if relay(msg, ctx, on_rows):
                continue
            if isinstance(msg, Done):
                outcome = msg
            else:
                raise TypeError(f"unknown message from the run process: {msg!r}")
    finally:
        # Done or dying: let it exit (its exit code names the signal). Anything else is
        # an error on this side, leaving through here: do not leave it training.
        proc.join(10 if (outcome is not None or ended) and not inbox.fenced else 0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        inbox.kill = None
        here.close()
    if inbox.fenced:
        raise Cancelled(inbox.cancel_reason)
    if outcome is None:
        raise TrainingError(f"the training process died: {_exit_text(proc.exitcode)}")
    if outcome.outcome == "completed":
        return Summary.from_dict(outcome.payload)
    if outcome.outcome == "cancelled":
        raise Cancelled(outcome.payload)
    raise TrainingError(outcome.payload)


def _exit_text(code: Optional[int]) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (the kernel's out-of-memory killer sends this)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"
