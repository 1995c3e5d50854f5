"""Dependencies point one way: server/, workers/ and client/ import `trainctl` (the
package root folder), never each other, and the root imports none of them. Loading the
server must not load the training stack's modules (it once loaded ~20 through spec.py)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"server": "trainctl.server", "workers": "trainctl.workers", "client": "trainctl.client"}


def _imports(path: Path, package: str):
    """(line, absolute module name) for every import in the file, function-level ones too."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield node.lineno, mod
            for alias in node.names:  # `from trainctl import workers`
                yield node.lineno, f"{mod}.{alias.name}"


def _modules(folder: Path, package: str):
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder).with_suffix("")
        yield path, ".".join([package, *rel.parts[:-1]])  # the package it sits in


def _crossings(folder: Path, package: str, banned: list[str]) -> list[str]:
    out = {}
    for path, pkg in _modules(folder, package):
        for line, mod in sorted(_imports(path, pkg)):
            where = f"{folder.name}/{path.relative_to(folder)}:{line}"
            if where not in out and any(mod == b or mod.startswith(b + ".") for b in banned):
                out[where] = f"{where} imports {mod}"  # one finding per import statement
    return list(out.values())


def test_the_package_root_imports_no_side():
    # trainctl/ (the folder) holds only what every side shares; the subpackages mapped
    # from server/, workers/, client/ live in their own folders, so none is walked here.
    assert _crossings(ROOT / "trainctl", "trainctl", list(SIDES.values())) == []


def test_server_and_workers_import_no_other_side():
    assert _crossings(ROOT / "server", SIDES["server"],
                      [SIDES["workers"], SIDES["client"]]) == []
    assert _crossings(ROOT / "workers", SIDES["workers"],
                      [SIDES["server"], SIDES["client"]]) == []


def test_the_client_reaches_other_sides_only_where_it_launches_them():
    # `trainctl server` and `trainctl worker` start those processes (function-level
    # imports, so loading the client loads neither), and `schedule preview` counts an
    # imagefolder's steps with the worker's loader (only the worker extra has torch).
    # Anything else is a new crossing.
    found = {m.split(":")[0] + " -> " + m.split(" imports ")[1]
             for m in _crossings(ROOT / "client", SIDES["client"], [SIDES["server"], SIDES["workers"]])}
    assert found <= {
        "client/cli.py -> trainctl.server.app", "client/cli.py -> trainctl.server.auth",
        "client/cli.py -> trainctl.server.store.errors", "client/cli.py -> trainctl.workers.agent",
        "client/preview.py -> trainctl.workers.engine.data",
    }, found


def test_the_walk_sees_a_crossing(tmp_path):
    # The checks above cannot pass vacuously: a planted import (relative or absolute,
    # module- or function-level) is found.
    (tmp_path / "bad.py").write_text(
        "def f():\n    from trainctl.workers.engine import loop\n"
        "from trainctl import server\n")
    found = _crossings(tmp_path, "trainctl", list(SIDES.values()))
    assert [m.split(" imports ")[1] for m in found] == ["trainctl.workers.engine",
                                                        "trainctl.server"]


def test_loading_server_and_client_loads_no_worker_module():
    # Every module of the server and of the client (not just their entry points), then
    # the spec: none may pull in trainctl.workers (or torch).
    code = (
        "import importlib, pkgutil, sys\n"
        "import trainctl.server, trainctl.client, trainctl.spec\n"
        "for pkg in (trainctl.server, trainctl.client):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if '.migrations.' in m.name: continue  # alembic scripts, run by alembic\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m.startswith('trainctl.workers') or m == 'torch')\n"
        "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
