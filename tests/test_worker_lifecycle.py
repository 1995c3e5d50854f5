"""The worker's own story, told at INFO with ids (issue 11 items 13-14), and what it
refuses to read (issue 10 item 14): a real server and real worker processes."""
from __future__ import annotations

import time

import pytest

from tests.conftest import Cluster, digits_spec

pytestmark = pytest.mark.slow


def test_bad_token_fails_before_torch_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINCTL_LOG", "INFO")
    c = Cluster(tmp_path, ["--worker-token", "right-token"])
    try:
        t0 = time.monotonic()
        bad = c.add_worker("bad", "--token", "wrong-token")
        assert bad.popen.wait(60) == 3
        took = time.monotonic() - t0
        out = bad.output()
        assert "UNAUTHENTICATED" in out
        # Refused while the forkserver was still importing torch, not after (the old order:
        # torch first, then connect, ~17 s on a busy box). Timing is a figure, not a test.
        assert "ready: torch loaded" not in out, out
        print(f"bad-token worker exited after {took:.2f} s")
    finally:
        c.stop()


def test_lifecycle_lines_and_data_roots(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINCTL_LOG", "INFO")
    c = Cluster(tmp_path)
    allowed = tmp_path / "data"
    allowed.mkdir()
    try:
        w = c.add_worker("w0", "--data-root", str(allowed))
        cl = c.client()
        x = cl.submit(digits_spec("ok", epochs=1, max_steps=2))
        assert cl.wait(x.id, timeout=300).state == "COMPLETED", c.logs()
        # Outside the roots: refused with one message, whether the path exists or not.
        answers = []
        for path in ("/etc", "/no/such/dir", str(allowed / ".." / "runs"), str(tmp_path / "nope")):
            y = cl.submit({**digits_spec("sneaky"), "data": {"dataset": "imagefolder", "path": path}})
            final = cl.wait(y.id, timeout=120)
            assert final.state == "FAILED"
            answers.append(final.message.replace(repr(path), "PATH"))
        assert len(set(answers)) == 1, answers
        assert "data.path: PATH is outside this worker's data roots" in answers[0]
        inside = cl.submit({**digits_spec("inside"), "data": {"dataset": "imagefolder", "path": str(allowed)}})
        final = cl.wait(inside.id, timeout=120)
        assert final.state == "FAILED" and "outside" not in final.message   # allowed, just not a dataset
        time.sleep(0.5)
        out = w.output()
        for line in ("worker w0 connected to", f"experiment {x.id} attempt 1 started: 'ok'",
                     f"experiment {x.id} attempt 1 completed: 2 steps", f"experiment {y.id} attempt 1 failed"):
            assert line in out, (line, out)
    finally:
        c.stop()
