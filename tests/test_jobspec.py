"""The job spec model (trainctl/jobspec.py): defaults, the Struct round trip, and errors
that name the field. In-process; the server's use of it is in test_submit_code.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainctl.jobspec import is_job, parse_job
from trainctl.spec import SpecError
from trainctl.wire import dict_from_struct, struct_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_struct_round_trip():
    raw = {"name": "mlp-code", "command": "python train.py --epochs 3", "env": {"SEED": 1, "MODE": "fast"},
           "resources": {"gpus": 1, "memory_gb": 2.5}, "tags": ["a", "b"], "max_restarts": 2}
    job = parse_job(dict_from_struct(struct_from_dict(raw)))   # as the server sees it: numbers are doubles
    d = job.to_dict()
    assert d == {"name": "mlp-code", "command": "python train.py --epochs 3", "env": {"SEED": "1", "MODE": "fast"},
                 "resources": {"gpus": 1, "memory_gb": 2.5}, "tags": ["a", "b"], "max_restarts": 2,
                 "keep_checkpoints": 3, "cancel_grace_s": 10.0}
    assert isinstance(d["max_restarts"], int) and isinstance(d["resources"]["gpus"], int)
    assert parse_job(d).to_dict() == d   # what the server stores parses again (worker, replay)


def test_is_job_tells_a_job_from_a_spec():
    assert is_job({"command": "x"}) and not is_job({"name": "t", "model": {}}) and not is_job(["command"])


@pytest.mark.parametrize("raw, field, words", [
    ({"name": "x"}, "command", "required"),
    ({"name": "x", "command": "   "}, "command", "must not be blank"),
    ({"name": "x", "command": "a\x00b"}, "command", "NUL"),
    ({"name": "x", "command": "a" * 5000}, "command", "4,096"),
    ({"name": "x", "command": "a", "comand": 1}, "comand", "did you mean command"),
    ({"name": "x", "command": "a", "model": {"name": "resnet18"}}, "model", "belong in a spec without one"),
    ({"name": "x", "command": "a", "env": {"TRAINCTL_TOKEN": "t"}}, "env", "set by the worker"),
    ({"name": "x", "command": "a", "env": {"1BAD": "t"}}, "env", "not a valid environment variable name"),
    ({"name": "x", "command": "a", "resources": {"memory_gb": 0}}, "resources.memory_gb", "must be > 0"),
    ({"name": "x", "command": "a", "resources": {"gpus": -1}}, "resources.gpus", "must be >= 0"),
    ({"name": "x", "command": "a", "max_restarts": 1000}, "max_restarts", "must be <= 100"),
    ({"name": "x", "command": "a", "cancel_grace_s": -1}, "cancel_grace_s", "must be >= 0"),
    ({"name": "x", "command": "a", "keep_checkpoints": 0}, "keep_checkpoints", "must be >= 1"),
    ({"name": "x", "command": "a", "code_sha256": "abc"}, "code_sha256", "64 lowercase hex"),
    ({"name": "bad name!", "command": "a"}, "name", "pattern"),
    ({"name": "x", "command": "a", "cancel_grace_s": float("inf")}, "cancel_grace_s", "finite"),
])
def test_bad_fields_are_named(raw, field, words):
    with pytest.raises(SpecError) as ei:
        parse_job(raw)
    msg = str(ei.value)
    assert msg.startswith(f"{field}:") or f"; {field}:" in msg, msg
    assert words in msg, msg


def test_every_fault_at_once():
    with pytest.raises(SpecError) as ei:
        parse_job({"command": "a", "max_restarts": -1, "resources": {"gpus": 99}})
    assert {e.split(":", 1)[0] for e in ei.value.errors} == {"name", "max_restarts", "resources.gpus"}


def test_example_job_specs_parse():
    jobs = sorted((ROOT / "examples" / "code").glob("*.yaml"))
    assert jobs, "examples/code has job specs"
    for path in jobs:
        data = yaml.safe_load(path.read_text())
        assert is_job(data), path
        parse_job({"name": "example", **data})
