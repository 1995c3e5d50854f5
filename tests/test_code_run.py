"""A worker running a submitted command (workers/code_run.py, workers/proc_group.py).

In-process, fast: a real Agent object whose outbox and log shipper are recorded, real
child processes, a real gRPC Artifacts server on loopback (a small fake servicer: the
fetch/cache logic is what is under test). Slow (real server and worker processes): the
same outcomes through `trainctl submit --code`, `get`, cancel, --no-code and the
memory cap.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from tests.conftest import wait_for
from trainctl.artifact_io import sha256_file
from trainctl.codepack import pack
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.wire import struct_from_dict
from trainctl.workers.agent import Agent
from trainctl.workers.proc_group import LINE_LIMIT, clean_line, exit_text, read_lines

STORE = "store-1"


# ---------------------------------------------------------------------- helpers


class Lines:
    """Wraps the agent's log shipper, recording what is added: (experiment, attempt, stream, text)."""

    def __init__(self, shipper):
        self.shipper = shipper
        self.lines: list[tuple[int, int, int, str]] = []

    def add(self, experiment_id, attempt, stream, text):
        self.lines.append((experiment_id, attempt, stream, text))
        return self.shipper.add(experiment_id, attempt, stream, text)

    def __getattr__(self, name):
        return getattr(self.shipper, name)

    def texts(self, stream) -> list[str]:
        return [t for _, _, s, t in self.lines if s == stream]


def make_agent(tmp: Path, server: str = "127.0.0.1:9") -> tuple[Agent, list[pb.StateUpdate], Lines]:
    agent = Agent(server, worker_id="w-test", workdir=str(tmp / "work"))
    states: list[pb.StateUpdate] = []
    agent.outbox.send = lambda msg, sticky=False: states.append(msg.state) if msg.HasField("state") else None
    agent.logs = Lines(agent.logs)
    return agent, states, agent.logs


def make_archive(tmp: Path, files: dict[str, str], name: str = "proj") -> tuple[Path, str]:
    src = tmp / name
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    out = tmp / f"{name}.tar"
    pack(src, out)
    return out, sha256_file(out)[0]


def cache(agent: Agent, archive: Path, sha: str) -> Path:
    dest = Path(agent.workdir) / "code-cache" / f"{sha}.tar"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(archive, dest)
    return dest


def assignment(sha: str, command: str, *, experiment_id: int = 1, attempt: int = 1, **job) -> pb.Assignment:
    spec = {"name": "job", "command": command, **({"code_sha256": sha} if sha else {}), **job}
    return pb.Assignment(experiment_id=experiment_id, attempt=attempt, name="job", spec=struct_from_dict(spec),
                         store_id=STORE, code_sha256=sha)


def ready_archive(tmp: Path, agent: Agent, files: dict[str, str] | None = None) -> str:
    archive, sha = make_archive(tmp, files or {"hello.txt": "hi\n"})
    cache(agent, archive, sha)
    return sha


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): it is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def train_in_thread(agent: Agent, a: pb.Assignment) -> threading.Thread:
    t = threading.Thread(target=agent._train, args=(a,), daemon=True)
    t.start()
    return t


def final(states: list[pb.StateUpdate]) -> pb.StateUpdate:
    ends = [s for s in states if s.state != pb.RUNNING]
    assert len(ends) == 1, states
    return ends[0]


# ---------------------------------------------------------------------- reading output


class _Stream:
    def __init__(self, chunks: list[bytes]):
        self.chunks = list(chunks)

    def read1(self, n):
        return self.chunks.pop(0) if self.chunks else b""


def test_lines_are_split_cut_and_redrawn_progress_keeps_its_last_drawing():
    got: list[str] = []
    read_lines(_Stream([b"a\r\nb", b"c\nprog 1%\rprog 50%\rprog 100%\n", b"x" * (LINE_LIMIT + 10), b"yz\n",
                        b"\xff\xfeend"]), got.append)
    assert got[:3] == ["a", "bc", "prog 100%"]
    assert got[3] == "x" * LINE_LIMIT + " [... 12 more bytes cut]"
    assert got[4] == "\ufffd\ufffdend"  # undecodable bytes replaced; a last line without newline kept


def test_an_endless_line_keeps_memory_bounded():
    big = [b"z" * 65536] * 200  # 12.5 MiB without a newline
    got: list[str] = []
    read_lines(_Stream(big), got.append)
    assert len(got) == 1 and got[0].startswith("z" * 100)
    assert got[0].endswith(f"[... {65536 * 200 - LINE_LIMIT} more bytes cut]")


def test_exit_text():
    assert exit_text(0) == "exit code 0"
    assert exit_text(3) == "exit code 3"
    assert exit_text(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_text(128 + signal.SIGSEGV) == "exit code 139 (a process it ran was killed by SIGSEGV)"
    assert clean_line(b"ok\r") == "ok"


# ---------------------------------------------------------------------- outcomes


def test_exit_0_completes_with_output_shipped_and_tree_removed(tmp_path):
    agent, states, lines = make_agent(tmp_path)
    sha = ready_archive(tmp_path, agent, {"run.sh": "cat hello.txt\necho to-stderr >&2\necho \"FOO=$FOO\"\n",
                                          "hello.txt": "hi from the archive\n"})
    agent._train(assignment(sha, "sh run.sh", env={"FOO": "bar"}))
    assert [s.state for s in states] == [pb.RUNNING, pb.COMPLETED]
    assert lines.texts(pb.STDOUT) == ["hi from the archive", "FOO=bar"]
    assert lines.texts(pb.STDERR) == ["to-stderr"]
    assert lines.texts(pb.SYSTEM) == ["$ sh run.sh", "ended: exit code 0"]
    assert {e for e, *_ in lines.lines} == {1}
    assert not (Path(agent.workdir) / STORE / "exp-1" / "a1").exists()  # the attempt's tree is gone
    assert agent.current is None


def test_a_job_without_code_runs_in_an_empty_folder(tmp_path):
    agent, states, lines = make_agent(tmp_path)  # its server is unreachable: nothing may be fetched
    agent._train(assignment("", "ls -A | wc -l; pwd"))
    assert [s.state for s in states] == [pb.RUNNING, pb.COMPLETED]
    count, cwd = lines.texts(pb.STDOUT)
    assert count.strip() == "0" and cwd.endswith("/exp-1/a1/src")


def test_exit_3_fails_with_the_last_stderr_lines(tmp_path):
    agent, states, _ = make_agent(tmp_path)
    sha = ready_archive(tmp_path, agent)
    cmd = "for i in $(seq 1 80); do echo line-$i >&2; done; echo out; exit 3"
    agent._train(assignment(sha, cmd))
    end = final(states)
    assert end.state == pb.FAILED
    head, tail = end.message.split(": ", 1)
    assert head == "exit code 3"
    assert tail.splitlines() == [f"line-{i}" for i in range(31, 81)]  # the last 50


def test_killed_by_a_signal(tmp_path):
    agent, states, _ = make_agent(tmp_path)
    sha = ready_archive(tmp_path, agent)
    agent._train(assignment(sha, "echo dying >&2; kill -KILL $$"))
    end = final(states)
    assert end.state == pb.FAILED and end.message == "killed by SIGKILL: dying"


def test_python_on_path_is_the_workers_and_worker_secrets_stay_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINCTL_WORKER_TOKEN", "secret-worker-token")
    agent, states, lines = make_agent(tmp_path)
    sha = ready_archive(tmp_path, agent)
    cmd = ("python -c 'import sys, os, trainctl; print(sys.executable); "
           "print(os.environ.get(\"TRAINCTL_WORKER_TOKEN\", \"no-token\"))'")
    agent._train(assignment(sha, cmd))
    assert final(states).state == pb.COMPLETED, states
    exe, token = lines.texts(pb.STDOUT)
    assert Path(exe).parent == Path(sys.executable).parent
    assert token == "no-token"


def _group_script(trap: str = "") -> str:
    # the shell starts a grandchild and writes both pids, then waits (forever)
    return f"{trap}sleep 1000 & echo $! > pids; echo $$ >> pids; echo started; while :; do sleep 0.1; done"


def _pids(agent: Agent) -> list[int]:
    f = Path(agent.workdir) / STORE / "exp-1" / "a1" / "src" / "pids"
    try:
        text = f.read_text().split()
    except FileNotFoundError:
        return []
    return [int(p) for p in text] if len(text) == 2 else []


def test_cancel_stops_the_whole_group(tmp_path):
    agent, states, lines = make_agent(tmp_path)
    sha = ready_archive(tmp_path, agent)
    t = train_in_thread(agent, assignment(sha, _group_script()))
    pids = wait_for(lambda: _pids(agent), what="the pids file")
    assert all(alive(p) for p in pids)
    agent._on_message(pb.ServerMessage(cancel=pb.CancelRun(experiment_id=1, attempt=1, reason="by test",
                                                           kind=pb.STOP_CANCELLED)))
    t.join(20)
    assert not t.is_alive()
    assert final(states).state == pb.CANCELLED and final(states).message == "by test"
    assert not any(alive(p) for p in pids), pids


def test_cancel_sigkills_after_the_grace_period_a_group_ignoring_sigterm(tmp_path):
    agent, states, lines = make_agent(tmp_path)
    sha = ready_archive(tmp_path, agent)
    t = train_in_thread(agent, assignment(sha, _group_script("trap '' TERM; "), cancel_grace_s=1.0))
    pids = wait_for(lambda: _pids(agent), what="the pids file")
    started = time.monotonic()
    agent._on_message(pb.ServerMessage(cancel=pb.CancelRun(experiment_id=1, attempt=1, reason="by test",
                                                           kind=pb.STOP_CANCELLED)))
    t.join(20)
    waited = time.monotonic() - started
    assert final(states).state == pb.CANCELLED
    assert not any(alive(p) for p in pids)
    assert waited >= 0.9  # SIGTERM was ignored: SIGKILL came after the grace period
    assert "still running after the grace period: SIGKILL" in lines.texts(pb.SYSTEM)


def test_fenced_is_killed_at_once_and_reports_nothing(tmp_path):
    agent, states, _ = make_agent(tmp_path)
    sha = ready_archive(tmp_path, agent)
    t = train_in_thread(agent, assignment(sha, _group_script("trap '' TERM; "), cancel_grace_s=60))
    pids = wait_for(lambda: _pids(agent), what="the pids file")
    agent._on_message(pb.ServerMessage(cancel=pb.CancelRun(experiment_id=1, attempt=1, reason="lease expired",
                                                           kind=pb.STOP_FENCED)))
    t.join(5)  # not the 60 s grace
    assert not t.is_alive()
    assert not any(alive(p) for p in pids)
    assert [s.state for s in states] == [pb.RUNNING]  # nothing after: the attempt is no longer ours


def test_worker_stopping_hands_the_run_back(tmp_path):
    agent, states, _ = make_agent(tmp_path)
    sha = ready_archive(tmp_path, agent)
    t = train_in_thread(agent, assignment(sha, _group_script()))
    pids = wait_for(lambda: _pids(agent), what="the pids file")
    agent.stop()  # what SIGTERM to the worker does
    t.join(20)
    end = final(states)
    assert end.state == pb.QUEUED and "handed back" in end.message
    assert not any(alive(p) for p in pids)


_ORPHAN_AGENT = """
import sys, time
from trainctl.workers.proc_group import ProcessGroup
g = ProcessGroup(sys.argv[1], cwd=sys.argv[2], env={"PATH": "/usr/bin:/bin"}, on_stdout=print, on_stderr=print)
time.sleep(1000)
"""


def test_the_group_dies_with_its_agent(tmp_path):
    """kill -9 of the agent: the lifeline's watchdog kills the command and its children
    (the run is requeued elsewhere; no copy of it trains on, orphaned)."""
    agent = subprocess.Popen([sys.executable, "-c", _ORPHAN_AGENT, _group_script(), str(tmp_path)])
    try:
        pids = wait_for(lambda: [int(p) for p in (tmp_path / "pids").read_text().split()]
                        if (tmp_path / "pids").exists() and len((tmp_path / "pids").read_text().split()) == 2
                        else None, 30, "the pids file")
        time.sleep(0.2)
        assert all(alive(p) for p in pids)
    finally:
        agent.kill()
        agent.wait()
    wait_for(lambda: not any(alive(p) for p in pids), 10, "the orphaned group to die")


def test_the_command_does_not_hold_the_lifeline(tmp_path):
    agent, states, lines = make_agent(tmp_path)
    sha = ready_archive(tmp_path, agent)
    # exec: python takes over the command's own fds. Past stdin/stdout/stderr it must hold
    # no pipe (a pipeline in sh would hold its own pipes for a moment: racy to count).
    count = ("import os, stat\n"
             "def fifo(fd):\n"
             "    try: return stat.S_ISFIFO(os.fstat(fd).st_mode)\n"
             "    except OSError: return False\n"
             "print(sum(fifo(fd) for fd in range(3, 1024)))")
    agent._train(assignment(sha, f"exec python -c '{count}' < /dev/null"))
    assert final(states).state == pb.COMPLETED
    assert lines.texts(pb.STDOUT) == ["0"]


def test_memory_cap_fails_the_run_and_the_worker_goes_on(tmp_path):
    agent, states, _ = make_agent(tmp_path)
    sha = ready_archive(tmp_path, agent)
    hog = "python -c 'x = bytearray(1 << 30); print(len(x))'"  # 1 GiB under a 0.25 GB cap
    agent._train(assignment(sha, hog, resources={"memory_gb": 0.25}))
    end = final(states)
    assert end.state == pb.FAILED
    assert end.message.startswith("exit code 1 (its address space is capped at 0.25 GB by resources.memory_gb)")
    assert "MemoryError" in end.message
    states.clear()
    agent._train(assignment(sha, hog, experiment_id=2))  # the same command without a cap: fine
    assert final(states).state == pb.COMPLETED


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_command_filling_the_disk_fails_its_run_not_the_worker(tmp_path, small_disk):
    agent, states, lines = make_agent(tmp_path)
    agent.workdir = small_disk
    sha = ready_archive(tmp_path, agent)
    agent._train(assignment(sha, "dd if=/dev/zero of=fill bs=1M count=64"))
    end = final(states)
    assert end.state == pb.FAILED and "No space left on device" in end.message, end.message
    assert shutil.disk_usage(small_disk).free > 12 * 2**20  # its tree was removed: the space is back
    states.clear()
    agent._train(assignment(sha, "cat hello.txt", experiment_id=2))
    assert final(states).state == pb.COMPLETED
    assert "hi" in lines.texts(pb.STDOUT)


def test_a_bad_job_spec_fails_naming_the_field(tmp_path):
    agent, states, _ = make_agent(tmp_path)
    sha = ready_archive(tmp_path, agent)
    agent._train(assignment(sha, "true", cancel_grace_s=-1))
    end = final(states)
    assert end.state == pb.FAILED and "cancel_grace_s" in end.message


def test_heartbeats_carry_the_step_the_commands_sdk_reported(tmp_path):
    agent, states, lines = make_agent(tmp_path)
    script = ("import os, time, trainctl\n"
              "run = trainctl.init()\n"
              "for i in range(7):\n"
              "    run.step()\n"
              "    run.log(loss=1.0 / (i + 1))\n"
              "while not os.path.exists('go'):\n"
              "    time.sleep(0.05)\n"
              "run.finish()\n")
    sha = ready_archive(tmp_path, agent, {"train.py": script})
    t = train_in_thread(agent, assignment(sha, "python train.py"))
    wait_for(lambda: agent._heartbeat().step == 6, 60, "step 6 in the heartbeat")
    (Path(agent.workdir) / STORE / "exp-1" / "a1" / "src" / "go").touch()
    t.join(60)
    assert final(states).state == pb.COMPLETED, (states, lines.lines)


# ---------------------------------------------------------------------- fetching and the cache


class _Artifacts(pb_grpc.ArtifactsServicer):
    """Serves blobs by sha256 and counts downloads."""

    def __init__(self):
        self.blobs: dict[str, bytes] = {}
        self.downloads = 0
        self.corrupt_next = 0

    def Download(self, request, context):
        data = self.blobs.get(request.sha256)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"sha256 {request.sha256}: no such artifact")
        self.downloads += 1
        yield pb.DownloadChunk(artifact=pb.Artifact(name="code", kind=pb.ARTIFACT_CODE, sha256=request.sha256,
                                                    size=len(data)))
        if self.corrupt_next:
            self.corrupt_next -= 1
            data = b"X" + data[1:]
        for i in range(0, len(data), 1 << 20):
            yield pb.DownloadChunk(data=data[i:i + (1 << 20)])


@pytest.fixture
def artifacts_server():
    servicer = _Artifacts()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_ArtifactsServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_archive_fetched_once_per_sha_and_refetched_when_the_cache_is_damaged(tmp_path, artifacts_server):
    servicer, address = artifacts_server
    agent, states, lines = make_agent(tmp_path, address)
    archive, sha = make_archive(tmp_path, {"hello.txt": "fetched\n"})
    servicer.blobs[sha] = archive.read_bytes()
    servicer.corrupt_next = 1  # the first transfer arrives damaged: fetched again
    agent._train(assignment(sha, "cat hello.txt"))
    agent._train(assignment(sha, "cat hello.txt", attempt=2))
    assert [s.state for s in states] == [pb.RUNNING, pb.COMPLETED] * 2
    assert servicer.downloads == 2  # one damaged transfer, then the cache served the second attempt
    cached = Path(agent.workdir) / "code-cache" / f"{sha}.tar"
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")  # damaged on disk
    agent._train(assignment(sha, "cat hello.txt", attempt=3))
    assert servicer.downloads == 3 and final(states[4:]).state == pb.COMPLETED
    assert sha256_file(cached)[0] == sha
    assert lines.texts(pb.STDOUT) == ["fetched"] * 3


def test_missing_archive_fails_the_run(tmp_path, artifacts_server):
    _, address = artifacts_server
    agent, states, _ = make_agent(tmp_path, address)
    agent._train(assignment("ab" * 32, "true"))
    end = final(states)
    assert end.state == pb.FAILED and end.message == f"code archive {'ab' * 6} is not in the server's artifact store"


def test_cancel_while_the_server_is_unreachable(tmp_path):
    agent, states, _ = make_agent(tmp_path, "127.0.0.1:9")  # nothing listens there
    t = train_in_thread(agent, assignment("cd" * 32, "true"))
    wait_for(lambda: agent.current is not None, what="the run")
    time.sleep(0.3)
    agent.current.inbox.cancel("by test")
    t.join(10)
    assert not t.is_alive() and final(states).state == pb.CANCELLED


# ---------------------------------------------------------------------- dispatch


def test_no_code_worker_is_never_given_a_code_run(tmp_path):
    from trainctl.server.store import entities as E
    from trainctl.server.store.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    code = store.create_experiment("c", {"name": "c", "command": "true"}, kind=E.CODE)
    spec = store.create_experiment("s", {"name": "s"})
    assert store.claim_next("w-nocode", 0, accepts_code=False).id == spec.id  # the older CODE run is skipped
    assert store.claim_next("w-nocode", 0, accepts_code=False) is None
    assert store.claim_next("w-code", 0).id == code.id


# ---------------------------------------------------------------------- real server and workers


@pytest.fixture(scope="module")
def code_cluster(tmp_path_factory):
    """A server, a --no-code worker (connected first, so it is offered every run first)
    and a worker that runs code."""
    from tests.conftest import NO_SPEC_RUNS, Cluster

    tmp = tmp_path_factory.mktemp("code")
    c = Cluster(tmp)
    try:
        c.add_worker("w-nocode", "--no-code", env=NO_SPEC_RUNS)
        _until_connected(c, "w-nocode")
        c.add_worker("w-code", env=NO_SPEC_RUNS)
        _until_connected(c, "w-code")
        yield c
    finally:
        c.stop()


def _until_connected(c, worker_id: str, timeout: float = 120) -> None:
    with grpc.insecure_channel(c.address) as ch:
        stub = pb_grpc.ExperimentsStub(ch)

        def connected():
            return any(w.worker_id == worker_id and w.connected
                       for w in stub.ListWorkers(pb.ListWorkersRequest(), timeout=5).workers)

        try:
            wait_for(connected, timeout, f"worker {worker_id} to connect")
        except AssertionError:
            raise AssertionError(c.logs()) from None


def _submit(c, tmp: Path, command: str, **job):
    code = tmp / "code"
    code.mkdir(exist_ok=True)
    (code / "main.sh").write_text("echo from-main-sh\n")
    with c.client() as client:
        return client.submit({"name": "job", "command": command, **job}, code_dir=code)


def _wait(c, id: int, timeout: float = 120):
    with c.client() as client:
        try:
            return client.wait(id, timeout=timeout)
        except Exception:
            print(c.logs())
            raise


@pytest.mark.slow
def test_real_exit_codes_and_stderr_tail_in_get(code_cluster, tmp_path):
    c = code_cluster
    ok = _submit(c, tmp_path, "sh main.sh")
    failing = _submit(c, tmp_path, "echo first >&2; echo 'Traceback: boom' >&2; exit 3")
    killed = _submit(c, tmp_path, "kill -KILL $$")
    x = _wait(c, ok.id)
    assert (x.state, x.worker_id, x.kind) == ("COMPLETED", "w-code", "CODE"), x
    x = _wait(c, failing.id)
    assert (x.state, x.message) == ("FAILED", "exit code 3: first\nTraceback: boom"), x
    out = subprocess.run([sys.executable, "-m", "trainctl.client.cli", "get", str(failing.id), "--server", c.address],
                         capture_output=True, text=True, timeout=60)
    assert "Traceback: boom" in out.stdout, out
    x = _wait(c, killed.id)
    assert (x.state, x.message) == ("FAILED", "killed by SIGKILL"), x


@pytest.mark.slow
def test_real_cancel_kills_the_group_and_no_code_worker_takes_nothing(code_cluster, tmp_path):
    c = code_cluster
    pids = tmp_path / "pids"
    first = _submit(c, tmp_path, 'sleep 1000 & echo $! > "$PIDS"; echo $$ >> "$PIDS"; wait', env={"PIDS": str(pids)})
    two = wait_for(lambda: [int(p) for p in pids.read_text().split()] if pids.exists() and
                   len(pids.read_text().split()) == 2 else None, 120, "the command's pids")
    assert all(alive(p) for p in two)
    # w-code is busy and w-nocode idle: a second code run waits for w-code
    second = _submit(c, tmp_path, "sh main.sh")
    time.sleep(2.0)  # four dispatch passes
    with c.client() as client:
        assert client.get(second.id).state == "QUEUED"
        client.cancel(first.id, "by test")
    x = _wait(c, first.id)
    assert x.state == "CANCELLED"
    wait_for(lambda: not any(alive(p) for p in two), 10, "the group to be gone")
    x = _wait(c, second.id)
    assert (x.state, x.worker_id) == ("COMPLETED", "w-code"), x


@pytest.mark.slow
def test_real_memory_cap_fails_the_run_and_the_worker_keeps_serving(code_cluster, tmp_path):
    c = code_cluster
    hog = _submit(c, tmp_path, "python -c 'x = bytearray(1 << 30)'", resources={"memory_gb": 0.25})
    after = _submit(c, tmp_path, "sh main.sh")
    x = _wait(c, hog.id)
    assert x.state == "FAILED" and "MemoryError" in x.message and "resources.memory_gb" in x.message, x
    assert _wait(c, after.id).state == "COMPLETED"
    assert all(w.popen.poll() is None for w in c.workers)


@pytest.mark.slow
def test_real_worker_on_a_full_disk_fails_the_run_and_keeps_serving(tmp_path, small_disk):
    """The worker's workdir (code cache, unpacked trees, its spill file) on a 16 MiB tmpfs;
    a command fills it: that run fails, the worker lives on and runs the next."""
    from tests.conftest import NO_SPEC_RUNS, Cluster

    c = Cluster(tmp_path)
    try:
        c.add_worker("w-disk", "--workdir", str(small_disk), env=NO_SPEC_RUNS)  # the last --workdir wins
        _until_connected(c, "w-disk")
        filler = _submit(c, tmp_path, "dd if=/dev/zero of=fill bs=1M count=64")
        after = _submit(c, tmp_path, "sh main.sh")
        x = _wait(c, filler.id)
        assert x.state == "FAILED" and "No space left on device" in x.message, x
        assert _wait(c, after.id).state == "COMPLETED"
        assert c.workers[0].popen.poll() is None
        assert shutil.disk_usage(small_disk).free > 12 * 2**20
    finally:
        c.stop()
