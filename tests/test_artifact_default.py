"""Where a server keeps artifacts when not told (--artifacts): beside a SQLite file, else
under the directory it was started in, which it then says at WARNING on startup (a
PostgreSQL server started from a checkout once filled the checkout with blobs)."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import Proc, free_port, wait_healthy
from trainctl.server.artifacts import default_location, sqlite_file


def test_default_location_is_beside_a_sqlite_file_else_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_location(f"sqlite:///{tmp_path}/db/t.db") == str(tmp_path / "db" / "artifacts")
    assert default_location("runs.db") == str(tmp_path / "artifacts")  # a bare path is a SQLite file here
    assert sqlite_file("runs.db") == Path("runs.db")
    for url in ("postgresql://trainctl@db/trainctl", "sqlite://", "sqlite:///:memory:"):
        assert sqlite_file(url) is None and default_location(url) == str(tmp_path / "artifacts")


@pytest.mark.slow
@pytest.mark.parametrize("db, warned", [("sqlite://", True), ("{tmp}/t.db", False)])
def test_the_server_warns_when_artifacts_land_in_its_working_directory(tmp_path, monkeypatch, db, warned):
    monkeypatch.chdir(tmp_path)  # the server's working directory: its default artifacts go there
    address = f"127.0.0.1:{free_port()}"
    proc = Proc(["server", "--listen", address, "--db", db.format(tmp=tmp_path)], tmp_path / "server.log")
    try:
        wait_healthy(address, proc)
    finally:
        proc.stop(signal.SIGTERM)
    out = proc.output()
    assert ("WARNING" in out and "pass --artifacts DIR|URL" in out) == warned, out[-2000:]
    assert f"artifact store: {tmp_path}/artifacts" in out
