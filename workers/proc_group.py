"""A shell command in its own process group, its output read line by line.

Why a group: the command is the user's (`python train.py`, a shell script starting
helpers, a launcher forking data-loader workers); cancelling or fencing the run must
stop every process it started, not only the shell. `start_new_session` makes the shell
the leader of a fresh session and group, and every signal goes to the whole group.

Reaping is done with care: the leader is waited for with WNOWAIT first, so while the
group is signalled after the leader exited, the leader is still a zombie and its pid
(the group id) cannot have been reused by an unrelated process.

The group dies with the agent (the lifeline, see _WRAPPER), and the memory cap
(RLIMIT_AS) is set by the wrapping shell's `ulimit -v`, not by a preexec_fn: the agent
has gRPC threads, and running Python between fork and exec in a threaded process can
deadlock.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Callable, Optional

from trainctl.logtext import MAX_TEXT_BYTES

LINE_LIMIT = MAX_TEXT_BYTES   # bytes of one line kept (LogLine.text's bound); the rest is counted and cut
READ_CHUNK = 64 * 1024

Emit = Callable[[str], None]


def clean_line(raw: bytes, cut: int = 0) -> str:
    """One output line as text: a trailing CR dropped (CRLF output), a line redrawn with
    CRs (a progress bar) reduced to what a terminal would show, at most LINE_LIMIT bytes."""
    raw = raw.rstrip(b"\r")
    r = raw.rfind(b"\r")
    if r >= 0:
        raw = raw[r + 1:]
    if len(raw) > LINE_LIMIT:
        cut += len(raw) - LINE_LIMIT
        raw = raw[:LINE_LIMIT]
    text = raw.decode("utf-8", errors="replace")
    return f"{text} [... {cut} more bytes cut]" if cut else text


def read_lines(stream, emit: Emit) -> None:
    """Call `emit` with each line of a binary stream until EOF. Memory stays bounded
    whatever the stream holds: a line longer than LINE_LIMIT keeps its head (or, when it
    is redrawn with CRs, its latest redraw) and counts what it drops."""
    buf = b""
    cut = 0
    while True:
        try:
            chunk = stream.read1(READ_CHUNK)
        except (OSError, ValueError):  # closed under us
            break
        if not chunk:
            break
        buf += chunk
        start = 0  # (slicing the rest off for each line would copy the buffer once per line)
        while (i := buf.find(b"\n", start)) >= 0:
            emit(clean_line(buf[start:i], cut))
            cut = 0
            start = i + 1
        buf = buf[start:]
        if len(buf) > LINE_LIMIT:
            r = buf.rfind(b"\r", 0, len(buf) - 1)
            if r >= 0:  # redrawn: only the latest drawing matters
                buf = buf[r + 1:]
            if len(buf) > LINE_LIMIT:
                cut += len(buf) - LINE_LIMIT
                buf = buf[:LINE_LIMIT]
    if buf or cut:
        emit(clean_line(buf, cut))


def exit_text(returncode: int) -> str:
    """How a command ended, in words: "exit code 3", "killed by SIGKILL"; a shell's
    128+N code for a child it ran that a signal killed says so too."""
    if returncode < 0:
        return f"killed by {_signame(-returncode) or f'signal {-returncode}'}"
    if 128 < returncode <= 128 + 64 and (name := _signame(returncode - 128)):
        return f"exit code {returncode} (a process it ran was killed by {name})"
    return f"exit code {returncode}"


def _signame(n: int) -> Optional[str]:
    try:
        return signal.Signals(n).name
    except ValueError:
        return None


# Run as the group's leader before the command. The lifeline: a watchdog shell in the
# group blocks reading a pipe whose only write end the agent holds; when the agent dies
# (SIGKILL, the OOM killer) the read returns and the watchdog SIGKILLs the whole group,
# so no command outlives its worker (the run is requeued elsewhere). The command itself
# gets /dev/null as stdin and not the pipe. `ulimit -v` (KiB) caps the command's address
# space: set here, after the fork, never in the agent.
_WRAPPER = """exec 9<&0 </dev/null
(read _ <&9; kill -KILL 0) >/dev/null 2>&1 &
exec 9<&-
{ulimit}exec /bin/sh -c "$1"
"""


class ProcessGroup:
    """`/bin/sh -c command` as the leader of its own process group, stdout and stderr
    read by two threads into `on_stdout` / `on_stderr`, one call per line."""

    def __init__(self, command: str, *, cwd: str, env: dict[str, str], memory_bytes: Optional[int] = None,
                 on_stdout: Emit, on_stderr: Emit):
        script = _WRAPPER.format(ulimit=f"ulimit -v {max(1, memory_bytes // 1024)}\n" if memory_bytes else "")
        read_end, self._lifeline = os.pipe()  # the agent's end is close-on-exec: no other child holds it
        try:
            self.popen = subprocess.Popen(["/bin/sh", "-c", script, "sh", command], cwd=cwd, env=env, stdin=read_end,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                          close_fds=True)
        except BaseException:
            os.close(self._lifeline)
            raise
        finally:
            os.close(read_end)
        self.pid = self.popen.pid  # also the group id
        self._readers = [threading.Thread(target=read_lines, args=(s, fn), name=f"output-{self.pid}-{n}",
                                          daemon=True)
                         for s, fn, n in ((self.popen.stdout, on_stdout, "out"), (self.popen.stderr, on_stderr, "err"))]
        for t in self._readers:
            t.start()
        self.returncode: Optional[int] = None

    def exited(self) -> bool:
        """Whether the leader has exited (it is left a zombie until `reap`)."""
        if self.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None and info.si_pid == self.pid

    def signal(self, sig: int) -> bool:
        """Send `sig` to every process of the group; False when none is left."""
        try:
            os.killpg(self.pid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:  # a member turned into another user's (setuid): not ours to stop
            return True

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def reap(self, readers_timeout: float = 2.0) -> int:
        """After the leader exited: kill what it left behind in its group, collect its exit
        status, wait a little for the readers to drain the pipes. A process that left the
        group (setsid) and still holds the pipes only delays nothing: the readers are
        daemon threads and end when it closes them."""
        self.kill()
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self.returncode is None:
            self.returncode = self.popen.wait()
        for t, f in zip(self._readers, (self.popen.stdout, self.popen.stderr)):
            t.join(readers_timeout)
            if not t.is_alive():
                f.close()
        return self.returncode
