"""run.save / run.save_checkpoint / run.load_checkpoint (trainctl/attach/files.py) against
the real server (create_server, SQLite file, local artifact store) in this process.

An attached run uploads straight to the server with its run token; a submitted command's
run goes through the worker's local endpoint (a real Agent object here), and a restarted
attempt resumes from the assignment's checkpoint: the local copy when its sha256
matches, else downloaded. Network errors never raise into the loop."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import trainctl
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.workers.agent import Agent, _Run
from trainctl.workers.local_endpoint import LocalEndpoint

from tests.conftest import free_port
from tests.test_local_endpoint import _Inbox, server_in_thread


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("TRAINCTL_"):
            monkeypatch.delenv(k)


def _loop(run, steps: int) -> None:
    for s in range(steps):
        run.step()
        run.log(loss=float(s))


def _download(srv, ref: pb.ArtifactRef) -> bytes:
    return b"".join(c.data for c in srv.artifacts().Download(ref) if c.WhichOneof("part") == "data")


def test_attached_run_uploads_with_its_run_token(tmp_path):
    with server_in_thread(tmp_path) as srv:
        run = trainctl.init(name="files", server=srv.address)
        _loop(run, 5)
        f = tmp_path / "notes.txt"
        f.write_text("first")
        assert run.save(f) == "notes.txt"
        f.write_text("overwritten by the loop")  # after save: the upload has the saved bytes
        run.save({"w": torch.arange(3)}, "obj.pt")
        assert run.save_checkpoint({"epoch": 0}) == "ckpt-5-a1.pt"  # steps 0..4 are in it
        assert not run.resumed and run.load_checkpoint() is None  # nothing to resume outside a code run
        assert run.finish(timeout=30) == []
        arts = {a.name: a for a in srv.artifacts().ListArtifacts(pb.ListArtifactsRequest(experiment_id=run.id)).artifacts}
        assert {(n, a.kind, a.attempt) for n, a in arts.items()} == {
            ("notes.txt", pb.ARTIFACT_FILE, 1), ("obj.pt", pb.ARTIFACT_FILE, 1),
            ("ckpt-5-a1.pt", pb.ARTIFACT_CHECKPOINT, 1)}
        assert arts["ckpt-5-a1.pt"].step == 5
        assert _download(srv, pb.ArtifactRef(experiment_id=run.id, name="notes.txt")) == b"first"
        dest = tmp_path / "ck.pt"
        dest.write_bytes(_download(srv, pb.ArtifactRef(experiment_id=run.id, name="ckpt-5-a1.pt")))
        payload = torch.load(dest, weights_only=False)
        assert payload["user"] == {"epoch": 0} and payload["trainctl_run"]["step"] == 4
        assert (run.checkpoint_dir / "ckpt-5-a1.pt").is_file()


def test_a_checkpoint_is_stored_after_the_rows_it_covers(tmp_path):
    # The server resumes only from a checkpoint whose steps it holds: the step's row (still
    # open in the loop) goes first, and the upload waits for the rows to be acknowledged.
    with server_in_thread(tmp_path) as srv:
        run = trainctl.init(name="order", server=srv.address)
        _loop(run, 5)
        run.save_checkpoint({"w": 1})
        srv.until(lambda: srv.artifacts().ListArtifacts(pb.ListArtifactsRequest(experiment_id=run.id)).artifacts,
                  30, "the checkpoint stored")
        (loss,) = srv.store.get_metrics(run.id, names=["loss"])
        assert list(loss.steps) == [0, 1, 2, 3, 4]
        assert run.finish(timeout=30) == []


def test_bad_arguments_are_named(tmp_path):
    run = trainctl.init(name="args", server=f"127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match="path_or_obj"):
        run.save(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="name: required"):
        run.save({"a": 1})
    with pytest.raises(ValueError, match="name"):
        run.save({"a": 1}, "bad\nname")
    run.finish(timeout=0.5)


def test_unreachable_server_never_raises_and_finish_lists_what_is_missing(tmp_path):
    run = trainctl.init(name="offline", server=f"127.0.0.1:{free_port()}")
    _loop(run, 3)
    f = tmp_path / "notes.txt"
    f.write_text("x")
    t0 = time.monotonic()
    run.save(f)
    name = run.save_checkpoint({"w": 1})
    assert time.monotonic() - t0 < 1.0  # the loop does not wait for the network
    t0 = time.monotonic()
    missing = run.finish(timeout=2)
    assert time.monotonic() - t0 < 5
    text = "\n".join(missing)
    assert "'notes.txt' was not uploaded" in text and f"'{name}' was not uploaded" in text
    assert f"kept at {run.checkpoint_dir / name}" in text and (run.checkpoint_dir / name).is_file()


@pytest.mark.slow
def test_save_is_retried_until_the_server_answers(tmp_path):
    port = free_port()
    run = trainctl.init(name="later", server=f"127.0.0.1:{port}")
    _loop(run, 3)
    f = tmp_path / "notes.txt"
    f.write_text("late")
    run.save(f)
    time.sleep(1.0)  # attach and upload fail meanwhile, in the background
    with server_in_thread(tmp_path, port=port) as srv:
        assert run.finish(timeout=60) == []
        arts = srv.artifacts().ListArtifacts(pb.ListArtifactsRequest(experiment_id=run.id)).artifacts
        assert [a.name for a in arts] == ["notes.txt"]
        assert _download(srv, pb.ArtifactRef(experiment_id=run.id, name="notes.txt")) == b"late"


@pytest.mark.slow
def test_restarted_attempt_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    with server_in_thread(tmp_path) as srv:
        agent = Agent(srv.address, workdir=str(tmp_path / "w"), worker_id="w1")
        agent._ready.set()
        threading.Thread(target=agent._receive_forever, daemon=True).start()
        x = srv.store.create_experiment("resume", {"name": "resume"})
        srv.kick()
        a = agent.assignments.get(timeout=20)
        ep = LocalEndpoint(agent, a).start()
        agent.current = _Run(a, _Inbox())
        for k, v in ep.env().items():
            monkeypatch.setenv(k, v)
        # Attempt 1: ten steps, the knob steered at step 3, a checkpoint at the end.
        run = trainctl.init()
        tau = run.knob("tau", 0.5, low=0.0, high=1.0)
        for s in range(10):
            run.step()
            if s == 3:
                run.steering.apply(pb.SET_KNOB, 0.7, knob="tau")
            run.log(loss=float(s))
        assert run.save_checkpoint({"w": 42}) == "ckpt-10-a1.pt"
        assert run.finish(timeout=30) == [] and ep.final_state.state == pb.COMPLETED
        ep.stop()
        (record,) = srv.artifacts().ListArtifacts(pb.ListArtifactsRequest(experiment_id=x.id)).artifacts
        local = ep.checkpoint_dir / record.name
        local.write_bytes(b"damaged on this box")  # sha256 mismatch: fetched again

        # Attempt 2 (a new assignment of the same experiment, checkpoint from the store).
        a2 = pb.Assignment()
        a2.CopyFrom(a)
        a2.attempt = 2
        a2.checkpoint.CopyFrom(record)
        a2.controls.extend([
            pb.ControlRecord(command_id="k1", kind=pb.SET_KNOB, knob="tau", value=0.7, status=pb.APPLIED, applied_step=3),
            pb.ControlRecord(command_id="s1", kind=pb.SET_KNOB, knob="tau", value=0.8, status=pb.PENDING, at_step=12)])
        for attempt_agent in (agent, Agent("127.0.0.1:1", workdir=str(tmp_path / "w"), worker_id="w2")):
            # The second time the server is out of reach: the local copy (now good) is used.
            ep2 = LocalEndpoint(attempt_agent, a2).start()
            for k, v in ep2.env().items():
                monkeypatch.setenv(k, v)
            assert os.environ["TRAINCTL_CHECKPOINT_NAME"] == "ckpt-10-a1.pt"
            run2 = trainctl.init()
            tau2 = run2.knob("tau", 0.5, low=0.0, high=1.0)
            assert run2.resumed
            assert run2.load_checkpoint(timeout=10) == {"w": 42}
            assert run2.step_count == 9 and tau2.value == 0.7
            # k1 (step 3) is inside the checkpoint: not applied again; s1 (step 12) still to come.
            due = [c.command_id for c in [*run2._due, *run2._waiting]]
            assert due == ["s1"]
            _ = [run2.step() for _ in range(3)]
            assert run2.step_count == 12 and tau2.value == 0.8
            run2.finish(timeout=1)  # (attempt 2 holds no lease here: the server fences what it sends)
            ep2.stop()
        assert tau.value == 0.7
        agent.stopping.set()
