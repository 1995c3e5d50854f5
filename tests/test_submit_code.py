"""Submitting code: `trainctl submit job.yaml --code DIR` and the Client against the real
server (real gRPC on loopback, real SQLite file, the directory artifact store), the
server's Submit checks for job specs, and `artifacts` / `download` / `gc`.
Running the command is the worker's (test_code_run.py, test_code_e2e.py)."""
from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest
import yaml

from tests.conftest import digits_spec
from trainctl import artifact_io
from trainctl.client.cli import main
from trainctl.client.sdk import Client, TrainctlError
from trainctl.server.app import ServerConfig, create_server
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc


class Server:
    """The real server in a thread of this process (its own event loop), so tests can
    call the CLI's `main` and the sync Client directly, and read its store."""

    def __init__(self, tmp: Path):
        self.ready = threading.Event()
        self.cfg = ServerConfig(db_url=f"sqlite:///{tmp / 'trainctl.db'}", artifacts=str(tmp / "artifacts"),
                                heartbeat_interval=0.2, grace=0.5)
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "server did not start"

    async def _main(self):
        self.server, port = create_server("127.0.0.1:0", self.cfg)
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.store = self.server.live.store
        self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
        self.ready.set()
        await self.stop_event.wait()
        await self.server.stop(0.5)

    def stop(self):
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(20)


@pytest.fixture
def srv(tmp_path):
    s = Server(tmp_path)
    yield s
    s.stop()


def cli(srv, *args) -> int:
    return main([*args, "--server", srv.address])


def project(root: Path) -> Path:
    files = {"train.py": "print('training')\n", "lib/util.py": "X = 1\n", ".gitignore": "data/\n*.pt\n",
             "data/big.bin": "d" * 1000, "w.pt": "w", ".git/HEAD": "ref: refs/heads/main\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def job_file(tmp: Path, **fields) -> Path:
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump({"command": "python train.py --epochs 3", **fields}))
    return path


def code_records(srv) -> list:
    return srv.store.list_artifacts(0)


# ---------------------------------------------------------------------------- submit --code
def test_submit_code_stores_a_code_run_and_an_unchanged_tree_is_not_sent_twice(srv, tmp_path, capsys):
    code = project(tmp_path / "my proj")
    job = job_file(tmp_path, tags=["exp1"], env={"SEED": 3})
    assert cli(srv, "submit", str(job), "--code", str(code), "--json") == 0
    out, err = capsys.readouterr()
    x = json.loads(out)
    assert x["kind"] == "CODE" and x["name"] == "my-proj" and x["state"] == "QUEUED" and x["tags"] == ["exp1"]
    sha = x["code_sha256"]
    assert len(sha) == 64 and "uploaded" in err and sha[:12] in err
    stored = srv.store.get_experiment(x["id"])
    assert stored.kind == "CODE" and stored.spec["code_sha256"] == sha and stored.spec["env"] == {"SEED": "3"}
    assert stored.spec["command"] == "python train.py --epochs 3" and stored.spec["keep_checkpoints"] == 3
    [rec] = code_records(srv)
    assert (rec.sha256, rec.kind) == (sha, "ARTIFACT_CODE")
    # What the server holds is the tree minus ignored files and .git/.
    with Client(srv.address) as c:
        c.download(0, sha, tmp_path / "fetched")
    with tarfile.open(tmp_path / "fetched" / sha) as t:
        assert sorted(t.getnames()) == [".gitignore", "lib", "lib/util.py", "train.py"]

    # Unchanged tree (mtimes touched): Stat hit, nothing sent, same archive.
    for p in code.rglob("*"):
        os.utime(p, (1_000_000, 1_000_000))
    assert cli(srv, "submit", str(job), "--code", str(code)) == 0
    out, err = capsys.readouterr()
    assert "not uploaded" in out and f"submitted experiment {x['id'] + 1}" in out
    [again] = code_records(srv)
    assert again.created_at == rec.created_at   # an upload would have re-recorded it
    assert srv.store.get_experiment(x["id"] + 1).spec["code_sha256"] == sha

    # A change: a new archive, uploaded.
    (code / "train.py").write_text("print('changed')\n")
    assert cli(srv, "submit", str(job), "--code", str(code), "--json") == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["code_sha256"] != sha and "uploaded in" in err
    assert len(code_records(srv)) == 2

    assert cli(srv, "get", str(x["id"])) == 0
    out = capsys.readouterr().out
    assert "kind CODE" in out and "command: python train.py --epochs 3" in out and f"code: {sha[:12]}" in out
    assert f"code: {sha[:13]}" not in out


def test_upload_code_reports_progress_and_skips_what_the_server_has(srv, tmp_path):
    code = tmp_path / "p"
    code.mkdir()
    (code / "blob.bin").write_bytes(os.urandom(3 << 20))   # 3 chunks
    seen = []
    with Client(srv.address) as c:
        up = c.upload_code(code, progress=lambda done, total: seen.append((done, total)))
        assert up.uploaded and up.files == 1
        assert seen[-1] == (up.size, up.size) and len(seen) >= 3
        again = c.upload_code(code, progress=lambda *a: pytest.fail("nothing to send"))
        assert not again.uploaded and again.sha256 == up.sha256


def test_an_unchanged_tree_is_not_packed_again_and_a_touched_one_is_not_sent_again(srv, tmp_path, monkeypatch):
    from trainctl import codepack

    code = tmp_path / "p"
    code.mkdir()
    (code / "train.py").write_text("print('hi')\n")
    real_pack = codepack.pack
    with Client(srv.address) as c:
        first = c.upload_code(code)
        monkeypatch.setattr(codepack, "pack", lambda *a, **k: pytest.fail("an unchanged tree was packed again"))
        again = c.upload_code(code)
        assert (again.sha256, again.uploaded) == (first.sha256, False)
        os.utime(code / "train.py", ns=(1, 1))   # touched: packed again, same archive, not sent
        packs = []
        monkeypatch.setattr(codepack, "pack", lambda *a, **k: packs.append(1) or real_pack(*a, **k))
        touched = c.upload_code(code)
        assert (touched.sha256, touched.uploaded, len(packs)) == (first.sha256, False, 1)
        (code / "train.py").write_text("print('changed')\n")
        changed = c.upload_code(code)
        assert changed.uploaded and changed.sha256 != first.sha256


def test_a_spec_run_is_submitted_as_before(srv, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(digits_spec("plain")))
    assert cli(srv, "submit", str(spec), "--json") == 0
    x = json.loads(capsys.readouterr().out)
    assert (x["kind"], x["code_sha256"]) == ("SPEC", "")
    stored = srv.store.get_experiment(x["id"])
    assert stored.kind == "SPEC" and "command" not in stored.spec and "code_sha256" not in stored.spec
    assert code_records(srv) == []


def test_cli_refuses_a_tree_over_the_cap_or_with_a_link_out_and_sends_nothing(srv, tmp_path, capsys):
    code = project(tmp_path / "p")
    (code / "weights.npy").write_bytes(b"\0" * 700_000)
    (code / "lib" / "emb.npy").write_bytes(b"\0" * 500_000)
    job = job_file(tmp_path)
    assert cli(srv, "submit", str(job), "--code", str(code), "--max-code-mb", "1") == 2
    err = capsys.readouterr().err
    assert "over the 1.0 MB cap" in err and "weights.npy" in err and "683.6 KB" in err and "lib/emb.npy" in err
    assert cli(srv, "submit", str(job), "--code", str(code), "--max-code-mb", "2", "--json") == 0   # raised cap
    capsys.readouterr()
    os.symlink(str(tmp_path / "job.yaml"), code / "lib" / "outside.yaml")
    assert cli(srv, "submit", str(job), "--code", str(code)) == 2
    assert "'lib/outside.yaml'" in capsys.readouterr().err
    assert len(code_records(srv)) == 1   # only the good submit sent anything


def test_cli_needs_a_command_with_code(srv, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(digits_spec("plain")))
    assert cli(srv, "submit", str(spec), "--code", str(project(tmp_path / "p"))) == 2
    assert "needs a job spec, one with a `command`" in capsys.readouterr().err
    assert code_records(srv) == []


# ---------------------------------------------------------------------------- the server's checks
def test_submit_checks_the_job_and_its_archive(srv, tmp_path):
    with Client(srv.address) as c:
        sha = c.upload_code(project(tmp_path / "p")).sha256
        job = {"name": "j", "command": "python train.py"}

        def refused(spec, code_sha256=""):
            with pytest.raises(TrainctlError) as ei:
                c.submit(spec, code_sha256=code_sha256)
            return ei.value.code, ei.value.message

        code, msg = refused({**job, "max_restarts": -1, "resources": {"gpus": "two"}}, sha)
        assert code == "INVALID_ARGUMENT" and "max_restarts: must be >= 0" in msg and "resources.gpus" in msg
        code, msg = refused(job, "0" * 64)
        assert code == "FAILED_PRECONDITION" and "code_sha256" in msg and "000000000000" in msg
        code, msg = refused(job, "xyz")
        assert code == "INVALID_ARGUMENT" and msg.startswith("code_sha256:")
        code, msg = refused(digits_spec("s"), sha)            # code for a spec that names no command
        assert code == "INVALID_ARGUMENT" and "command: required" in msg
        code, msg = refused({**job, "tags": ["bad tag!"]}, sha)
        assert code == "INVALID_ARGUMENT" and "tags[0]" in msg
        n_before = len(srv.store.list_experiments(limit=1000))

        ok = c.submit({**job, "code_sha256": "f" * 64}, code_sha256=sha)   # the YAML cannot name the code
        assert ok.kind == "CODE" and ok.code_sha256 == sha and ok.spec["code_sha256"] == sha
        bare = c.submit({**job, "code_sha256": sha})                       # nor give it without the request
        assert bare.kind == "CODE" and bare.code_sha256 == "" and "code_sha256" not in bare.spec
        assert len(srv.store.list_experiments(limit=1000)) == n_before + 2


def test_a_hostile_archive_upload_is_refused_naming_the_member(srv, tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as t:
        ti = tarfile.TarInfo("ok.py")
        ti.size = 1
        t.addfile(ti, io.BytesIO(b"x"))
        ti = tarfile.TarInfo("lib/../../etc/cron.d/x")
        ti.size = 1
        t.addfile(ti, io.BytesIO(b"x"))
    import grpc

    with Client(srv.address) as c:
        with pytest.raises(grpc.RpcError) as ei:
            artifact_io.upload(c._artifacts, path, pb.Artifact(kind=pb.ARTIFACT_CODE), timeout=30)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'lib/../../etc/cron.d/x'" in ei.value.details()
    assert code_records(srv) == []


# ---------------------------------------------------------------------------- artifacts / download / gc
def test_artifacts_download_and_gc_commands(srv, tmp_path, capsys):
    import grpc

    ch = grpc.insecure_channel(srv.address)
    a = pb_grpc.ExperimentsStub(ch).Attach(pb.AttachRequest(name="saver"), timeout=30)
    xid = a.experiment.id
    payload = tmp_path / "metrics.csv"
    payload.write_bytes(os.urandom(200_000))
    artifact_io.upload(pb_grpc.ArtifactsStub(ch), payload,
                       pb.Artifact(kind=pb.ARTIFACT_FILE, experiment_id=xid, attempt=1, name="metrics.csv"),
                       run_token=a.run_token, timeout=30)
    ch.close()

    assert cli(srv, "artifacts", str(xid)) == 0
    out = capsys.readouterr().out
    assert "metrics.csv" in out and "file" in out and "195.3 KB" in out
    assert cli(srv, "artifacts", str(xid), "--json") == 0
    [rec] = json.loads(capsys.readouterr().out)
    assert (rec["name"], rec["kind"], rec["size"]) == ("metrics.csv", "file", 200_000)

    assert cli(srv, "download", str(xid), "metrics.csv", "-o", str(tmp_path / "one")) == 0
    assert (tmp_path / "one" / "metrics.csv").read_bytes() == payload.read_bytes()
    assert "(checked)" in capsys.readouterr().out
    assert cli(srv, "download", str(xid), "-o", str(tmp_path / "all"), "--json") == 0
    [got] = json.loads(capsys.readouterr().out)
    assert Path(got["path"]).read_bytes() == payload.read_bytes()
    assert cli(srv, "download", str(xid), "nope.txt") == 2
    assert "no artifact named 'nope.txt'" in capsys.readouterr().err

    assert cli(srv, "gc", "--dry-run", "--json") == 0
    r = json.loads(capsys.readouterr().out)
    assert r["dry_run"] is True and set(r) >= {"artifacts_removed", "blobs_removed", "bytes_freed"}
    assert cli(srv, "gc") == 0
    assert capsys.readouterr().out.startswith("removed ")
    assert cli(srv, "artifacts", "999") == 2   # an unknown experiment
    assert "NOT_FOUND" in capsys.readouterr().err


def test_an_archive_collected_between_stat_and_submit_is_sent_again(srv, tmp_path, monkeypatch):
    code = project(tmp_path / "p")
    with Client(srv.address) as c:
        sha = c.upload_code(code).sha256
        real_submit = Client.submit

        raced = []

        def racing_gc(self, spec, **kw):   # `gc` drops the (unreferenced) archive just before Submit
            if kw.get("code_sha256") and not raced:
                raced.append(srv.store.drop_artifacts([(0, sha, sha)]))
            return real_submit(self, spec, **kw)

        monkeypatch.setattr(Client, "submit", racing_gc)
        x = c.submit({"command": "python train.py"}, code_dir=code)
    assert raced == [1] and x.code_sha256 == sha and x.name == "p"
    assert [r.sha256 for r in code_records(srv)] == [sha]   # uploaded again


def test_on_a_terminal_the_upload_shows_a_progress_bar(srv, tmp_path, monkeypatch, capsys):
    from trainctl.client import code_cmds

    calls = []
    real = code_cmds.progress_bar

    def spy(label, enabled):
        calls.append(enabled)
        return real(label, enabled)

    monkeypatch.setattr(code_cmds, "progress_bar", spy)
    code = tmp_path / "p"
    code.mkdir()
    (code / "blob.bin").write_bytes(os.urandom(2 << 20))
    assert cli(srv, "submit", str(job_file(tmp_path)), "--code", str(code)) == 0   # pytest's stderr: no tty
    monkeypatch.setattr(code_cmds, "_isatty", lambda stream: True)
    (code / "blob.bin").write_bytes(os.urandom(2 << 20))
    assert cli(srv, "submit", str(job_file(tmp_path)), "--code", str(code)) == 0
    assert calls == [False, True] and "uploaded in" in capsys.readouterr().out


def test_replay_of_a_code_run_reruns_its_command_on_its_archive_with_its_commands(srv, tmp_path):
    from trainctl.server.store import entities as E

    with Client(srv.address) as c:
        x = c.submit(yaml.safe_load(job_file(tmp_path, tags=["t1"]).read_text()), code_dir=project(tmp_path / "p"))
        rec = srv.store.add_control(E.ControlRecord(
            command_id="c1", experiment_id=x.id, kind="SET_KNOB", value=0.5, status=E.PENDING, source=E.LIVE,
            requested_at=1.0, knob="tau"))
        srv.store.resolve_control(x.id, rec.command_id, status=E.APPLIED, applied_step=7, old_value=0.9,
                                  new_value=0.5)
        y = c.replay(x.id)
    stored = srv.store.get_experiment(y.id)
    assert (stored.kind, stored.replay_of, stored.tags) == ("CODE", x.id, ("t1",))
    assert stored.spec["code_sha256"] == x.code_sha256 and stored.spec["command"] == "python train.py --epochs 3"
    assert stored.name.endswith(f"-replay-of-{x.id}")
    [r] = srv.store.list_controls(y.id)
    assert (r.kind, r.knob, r.value, r.at_step, r.source, r.status) == ("SET_KNOB", "tau", 0.5, 7, "REPLAYED", "PENDING")
