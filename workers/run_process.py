"""The run process: the other end of the agent's pipe (workers/runner.py starts it).

Rows are batched in `BatchingSink` and sent by the training thread itself (no helper
thread) at most every `LINGER_S`; commands are read by `PipeInbox` with a non-blocking
poll at each step boundary. Every message is one of the types in workers/pipe.py.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from typing import Callable, Optional

from trainctl.workers.engine.context import STEP, Command, ControlInbox, TrainingContext
from trainctl.workers.pipe import (AGENT_SILENCE_S, LINGER_S, Acked, Cancel, Checkpointed, Control, Done,
                                   FromRun, LogText, Note, Progress, Row, Rows)

log = logging.getLogger(__name__)


def report_devices(conn) -> None:
    import torch

    if torch.cuda.is_available():
        devices = [{"kind": "cuda", "index": i, "name": torch.cuda.get_device_name(i),
                    "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                   for i in range(torch.cuda.device_count())]
    else:
        devices = [{"kind": "cpu", "index": 0, "name": f"{os.cpu_count()} cores"}]
    conn.send(devices)
    conn.close()


class BatchingSink:
    """A MetricsSink for a process that trains: rows collect in a list and go to `send`
    as one `Rows` message once `LINGER_S` has passed (checked when a row comes),
    at an epoch row, or on flush. No thread: the training thread sends, ~50 times a
    second at most, so nothing else in the process wakes per step."""

    def __init__(self, send: Callable[[FromRun], None]):
        self.send = send
        self.rows: list[Row] = []
        self.sent_at = time.monotonic()

    def log(self, scope: str, step: int, epoch: int, values: dict[str, float]) -> None:
        self.rows.append((scope, step, epoch, time.time(), values))
        if scope != STEP:  # an epoch's results: a line of the run's logging (`trainctl logs`)
            log.info("epoch %d (step %d): %s", epoch + 1, step,
                     "  ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
        if scope != STEP or time.monotonic() - self.sent_at >= LINGER_S:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.send(Rows(self.rows))
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
                if isinstance(msg, Control):
                    super().put(msg.command)
                elif isinstance(msg, Cancel):
                    self.cancel(msg.reason)
                # a Ping only proves the agent is alive (heard_at, above)
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


_send_lock = threading.Lock()  # the training thread and a logging thread may both send


def _send(conn, msg: FromRun) -> None:
    try:
        with _send_lock:
            conn.send(msg)
    except OSError:
        pass  # the agent is gone; the inbox notices and cancels at the next step


class PipeLogHandler(logging.Handler):
    """The run's Python logging (the `trainctl` loggers, INFO and up) down the pipe, one
    LogText per line: the agent ships them as the run's LOGGING output (`trainctl logs`).
    Only from this process: a forked data-loader worker inherits the handler, and two
    writers would corrupt the pipe."""

    MAX_LINES = 200  # of one record (a traceback); the rest is summed up in one line

    def __init__(self, conn):
        super().__init__(logging.INFO)
        self.conn, self.pid = conn, os.getpid()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() != self.pid:
            return
        try:
            lines = self.format(record).splitlines() or [""]
        except Exception:  # a bad format argument: logging's own rule is never to raise
            return
        if len(lines) > self.MAX_LINES:
            lines = lines[:self.MAX_LINES] + [f"... {len(lines) - self.MAX_LINES} more lines of this record"]
        for line in lines:
            _send(self.conn, LogText(line))


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


def run_main(conn, spec_dict: dict, commands: list[Command], checkpoint_dir: Optional[str],
              lineage=None) -> None:
    from trainctl.spec import SpecError, parse_spec
    from trainctl.workers.engine.loop import Cancelled, Trainer, TrainingError

    tune_malloc()

    # Ctrl-C in a terminal reaches the whole process group: the agent decides (it cancels
    # or hands the run back); this process only follows.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipe_log = PipeLogHandler(conn)
    logging.getLogger("trainctl").addHandler(pipe_log)
    inbox = PipeInbox(conn, on_ack=lambda ack: _send(conn, Acked(ack)))
    for cmd in commands:  # scheduled ones keep their at_step, live ones apply at once
        inbox.put(cmd)
    sink = BatchingSink(lambda msg: _send(conn, msg))
    ctx = TrainingContext(sink=sink, inbox=inbox, checkpoint_dir=checkpoint_dir, lineage=lineage,
                          on_progress=lambda step: _send(conn, Progress(step)),
                          on_note=lambda text: _send(conn, Note(text)),
                          on_checkpoint=lambda path, step: _send(conn, Checkpointed(path, step)))
    log.info("training %r: model %s", spec_dict.get("name"), (spec_dict.get("model") or {}).get("name"))
    try:
        summary = Trainer(parse_spec(spec_dict, check_model=False), ctx).run()
        outcome = Done("completed", summary.as_dict())
    except Cancelled as exc:
        outcome = Done("cancelled", str(exc))
    except (TrainingError, SpecError, ValueError, FileNotFoundError) as exc:
        outcome = Done("failed", str(exc))
    except Exception as exc:  # a bug or a runtime error (OOM, ...): still a clean FAILED
        log.error("run crashed:\n%s", traceback.format_exc())
        outcome = Done("failed", failure_reason(exc))
    log.info("run %s%s", outcome.outcome, "" if outcome.outcome == "completed" else f": {outcome.payload}")
    sink.flush()
    logging.getLogger("trainctl").removeHandler(pipe_log)
    _send(conn, outcome)
    conn.close()


def failure_reason(exc: BaseException) -> str:
    """One line a user can act on; out-of-memory (CUDA or host) is named as such."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    oom = type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower() \
        or "can't allocate memory" in text.lower()
    if oom:
        return f"out of memory: {text[:300]}"
    return f"{type(exc).__name__}: {text[:500]}"
