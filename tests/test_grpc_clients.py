"""docs/grpc-clients.md's Node.js client, run as written against a real server.

Needs `node` and the npm packages @grpc/grpc-js and @grpc/proto-loader, found through
NODE_PATH (e.g. `npm install --prefix ~/.cache/trainctl-node @grpc/grpc-js
@grpc/proto-loader` and NODE_PATH=~/.cache/trainctl-node/node_modules); skipped with the
reason otherwise.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cluster, digits_spec

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "grpc-clients.md"
pytestmark = pytest.mark.slow


def doc_script() -> str:
    (block,) = re.findall(r"<!-- tested by tests/test_grpc_clients.py[^>]*-->\n```js\n(.*?)```", DOC.read_text(),
                          re.S)
    return block


def _node() -> str:
    node = shutil.which("node")
    if not node:
        pytest.skip("node is not installed")
    probe = subprocess.run([node, "-e", "require('@grpc/grpc-js'); require('@grpc/proto-loader')"],
                           capture_output=True, text=True, env=os.environ)
    if probe.returncode != 0:
        pytest.skip("@grpc/grpc-js / @grpc/proto-loader not found through NODE_PATH")
    return node


def test_node_client_from_the_docs(tmp_path):
    node = _node()
    script = tmp_path / "watch.js"
    script.write_text(doc_script())
    c = Cluster(tmp_path)
    try:
        with c.client() as cl:
            x = cl.submit(digits_spec("node", epochs=2, max_steps=3, control=[{"at_step": 4, "scale_lr": 0.5}]))
            assert cl.set_lr(x.id, 0.02, wait=0).status == "PENDING"
            c.add_worker("w0")
            assert cl.wait(x.id, timeout=300).state == "COMPLETED", c.logs()
            stored = [(e.kind.upper(), e.step, e.epoch, e.values) for e in cl.history(x.id)
                      if e.kind in ("step", "epoch")]
        r = subprocess.run([node, str(script), str(x.id)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TRAINCTL_SERVER": c.address})
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert f"#{x.id} node COMPLETED" in lines
        assert f"experiment {x.id}: 2 epochs, state COMPLETED" in lines  # spec_json: an integer
        rows = [json.loads(ln) for ln in lines if ln.startswith("{")]
        assert [(r["scope"], r["step"], r["epoch"], r["values"]) for r in rows] == stored
        assert all(r["wall_time"] > 1e9 for r in rows)
        controls = [ln for ln in lines if ln.startswith("control ")]
        assert "control SET_LR 0.02 APPLIED step 0 (live)" in controls
        assert "control SCALE_LR 0.5 APPLIED step 4 (scheduled @4)" in controls
        assert lines[-1] == "state COMPLETED"
    finally:
        c.stop()
