"""Steering through the real CLI against a real server (issue 11 items 1 and 2):
`--dry-run` shows the consequence and stores/sends nothing, `set-decay` where no decay
can act is refused, and (slow, with a real worker) the ack's consequence is what the run
then does, `--hold` pins the LR and a replay reproduces the held curve."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import RESNET10T, Cluster, digits_spec


def run_cli(c: Cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainctl.client.cli", *args, "--server", c.address],
                          capture_output=True, text=True, timeout=180, env=dict(os.environ))


def test_dry_run_and_refused_decay_through_the_cli(server_only):
    c = server_only
    with c.client() as cl:
        x = cl.submit(digits_spec("dry", epochs=6))  # digits: 22 steps per epoch, known without data
        r = run_cli(c, "set-lr", str(x.id), "0.02", "--dry-run")
        assert r.returncode == 0, r.stderr
        assert "dry run: nothing stored or sent; SET_LR 0.02 would apply at step 0" in r.stdout
        assert re.search(r"warmup continues: peak [0-9.e-]+ at step 21, final [0-9.e-]+ at step 131", r.stdout), \
            r.stdout
        r = run_cli(c, "set-lr", str(x.id), "0.02", "--dry-run", "--hold")
        assert "LR held at 0.02 from step 0 to the end (step 131)" in r.stdout, r.stdout
        r = run_cli(c, "set-lr", str(x.id), "0.02", "--dry-run", "--json")
        assert json.loads(r.stdout)["consequence"].startswith("warmup continues")
        assert cl.controls(x.id) == []  # nothing stored
        r = run_cli(c, "set-decay", str(x.id), "0.5")  # cosine, one cycle: no decay ever acts
        assert r.returncode != 0 and "FAILED_PRECONDITION" in r.stderr and "cycle_limit 1" in r.stderr, r
        assert cl.controls(x.id) == []
        cl.cancel(x.id)


def _lr(cl, id) -> dict[int, float]:
    m = cl.metrics(id, scope="step", names=["lr"])
    (series,) = [s for k, s in m.items() if k.split("/")[-1] == "lr"]
    return dict(zip(series["step"], series["value"]))


def _parse_lr_words(text: str) -> tuple[dict, int, float]:
    """({step: value} named in the consequence, last step, final LR)."""
    named = {int(s): float(v) for v, s in re.findall(r"(?:peak|rises to) ([0-9.e+-]+) at step (\d+)", text)}
    final, last = re.search(r"final ([0-9.e+-]+) at step (\d+)", text).groups()
    return named, int(last), float(final)


@pytest.mark.slow
@pytest.mark.timeout(900)  # two real runs on a shared 2-core box
def test_consequence_hold_and_replay_with_a_real_worker(cluster):
    spec = digits_spec("steer", epochs=2, max_steps=8,  # 16 steps, warmup = the first 8
                       model=RESNET10T)  # still training when the CLI steers it
    cluster.add_worker("w0")           # first: its torch import overlaps the server's start
    with cluster.client() as cl:
        x = cl.submit(spec)
        deadline = time.monotonic() + 300
        while cl.get(x.id).state != "RUNNING":
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.2)
        r = run_cli(cluster, "set-lr", str(x.id), "0.02", "--wait", "120")
        assert r.returncode == 0, r.stderr + cluster.logs()
        m = re.search(r"SET_LR 0.02 applied at step (\d+): \S+ -> 0.02; (.+)$", r.stdout.strip())
        assert m, r.stdout
        applied, words = int(m.group(1)), m.group(2)
        r = run_cli(cluster, "set-lr", str(x.id), "0.005", "--hold", "--wait", "120")
        assert r.returncode == 0 and "LR held at 0.005 from step" in r.stdout, r.stdout + r.stderr
        held_at = int(re.search(r"applied at step (\d+)", r.stdout).group(1))
        assert cl.wait(x.id, timeout=600).state == "COMPLETED", cluster.logs()
        lr = _lr(cl, x.id)
        assert lr[applied] == pytest.approx(0.02, rel=1e-6)
        assert all(lr[s] == 0.005 for s in range(held_at, 16))  # pinned to the end
        if held_at > applied + 1:  # what the first ack said ahead, checked where it still held
            named, last, final = _parse_lr_words(words)
            assert last == 15
            for step, value in named.items():
                if step < held_at:
                    assert lr[step] == pytest.approx(value, rel=5e-3)
        # replay: same curve, hold included, bit for bit
        y = cl.replay(x.id)
        assert cl.wait(y.id, timeout=600).state == "COMPLETED", cluster.logs()
        assert _lr(cl, y.id) == lr
