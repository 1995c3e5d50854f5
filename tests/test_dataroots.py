"""Data roots (issue 10 item 14): a worker reads only files under its roots, and a path
outside gets one message whether or not it exists (no existence oracle)."""
from __future__ import annotations

import os

import pytest

from tests.test_loop_support import tiny_spec_dict
from trainctl.spec import parse_spec
from trainctl.workers.dataroots import OutsideDataRoots, check_path, check_spec, resolve_roots


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    (root / "set" / "train").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("x")
    (root / "escape").symlink_to(tmp_path / "secret")      # a link inside that leads out
    (tmp_path / "outside-link").symlink_to(root / "set")   # a link outside that leads in
    return tmp_path, resolve_roots([str(root)])


def test_paths_under_a_root_pass_resolved(tree):
    tmp, roots = tree
    assert check_path("data.path", str(tmp / "data" / "set"), roots) == str(tmp / "data" / "set")
    assert check_path("data.path", str(tmp / "data" / "nope"), roots) == str(tmp / "data" / "nope")
    assert check_path("data.path", str(tmp / "outside-link"), roots) == str(tmp / "data" / "set")


@pytest.mark.parametrize("rel", ["secret", "secret/key", "secret/missing", "missing", "data/../secret",
                                 "data/escape", "data/escape/key", "data/set/../../secret/key", "datafoo"])
def test_outside_is_refused_with_the_same_words_whether_or_not_it_exists(tree, rel):
    tmp, roots = tree
    path = str(tmp / rel)
    with pytest.raises(OutsideDataRoots) as err:
        check_path("data.path", path, roots)
    assert str(err.value) == (f"data.path: {path!r} is outside this worker's data roots ({roots[0]}); "
                              "start the worker with --data-root DIR to allow a directory")


def test_system_paths_and_relative_climbs_are_refused(tree, monkeypatch):
    tmp, _ = tree
    monkeypatch.chdir(tmp / "data")
    roots = resolve_roots(None)                    # default: the current directory only
    assert roots == [str(tmp / "data")]
    for path in ("/etc", "/root", "/etc/shadow", "../secret", "set/../../secret"):
        with pytest.raises(OutsideDataRoots):
            check_path("data.path", path, roots)
    assert check_path("data.path", "set", roots) == str(tmp / "data" / "set")


def test_spec_checks_data_path_and_weights_file(tree):
    tmp, roots = tree
    ok = parse_spec(tiny_spec_dict(data={"dataset": "imagefolder", "path": str(tmp / "data" / "set")}),
                    check_model=False)
    check_spec(ok, roots)
    check_spec(parse_spec(tiny_spec_dict(), check_model=False), roots)   # built-in datasets read no files
    bad = parse_spec(tiny_spec_dict(model={"name": "test_resnet", "weights": str(tmp / "secret" / "key")}),
                     check_model=False)
    with pytest.raises(OutsideDataRoots, match="model.weights"):
        check_spec(bad, roots)
    assert isinstance(OutsideDataRoots("x"), ValueError)   # the agent fails the run with it
    assert os.path.isabs(roots[0])
