"""A throwaway PostgreSQL server for the tests: initdb + pg_ctl in a temp dir, loopback only.

Loaded as a pytest plugin (`pytest_plugins = ["tests.pg"]` in a test module), so the
session-scoped server is started once however many modules use it:

    pg_server   the running server (session scope, ~2 s to start); skips the test with
                the reason when PostgreSQL's server binaries cannot be found
    pg_url      an empty database on it for one test, as a SQLAlchemy URL
                (postgresql+psycopg://...); afterwards it is emptied (its schema dropped
                and re-created, ~10 ms) and handed to a later test, since CREATE
                DATABASE costs ~0.2 s

Binaries are looked for in $TRAINCTL_PG_BIN, then PATH, `pg_config --bindir`, and the
usual install places (Debian/Ubuntu /usr/lib/postgresql/<v>/bin, RHEL /usr/pgsql-<v>/bin,
Homebrew, /usr/local/pgsql/bin), newest version first. PostgreSQL refuses to run as
root, so under root the server runs as the `postgres` system user (or `nobody`), and
owns its temp dir. Durability is switched off (fsync, synchronous_commit): the data
dies with the test session anyway.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

_NEEDED = ("initdb", "pg_ctl", "postgres")
SUPERUSER = "trainctl"

_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",  # TCP on loopback only; nothing outside the temp dir
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "'32MB'",
    "max_connections": "100",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %d '",
}


def _version_key(path: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""
    candidates: list[str] = []
    if os.environ.get("TRAINCTL_PG_BIN"):
        candidates.append(os.environ["TRAINCTL_PG_BIN"])
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                             timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/opt/homebrew/opt/postgresql*/bin",
                    "/usr/local/opt/postgresql*/bin", "/usr/local/pgsql/bin"):
        candidates.extend(sorted(glob.glob(pattern), key=_version_key, reverse=True))
    for c in candidates:
        if c and all(os.access(Path(c) / exe, os.X_OK) for exe in _NEEDED):
            return Path(c)
    return None


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster in a temp dir, reachable at 127.0.0.1:port as `trainctl`."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.user = _run_as()
        base = tempfile.gettempdir()
        if self.user is not None and not os.stat(base).st_mode & 0o001:
            base = "/tmp"  # the server's account must be able to reach its directory
        self.root = Path(tempfile.mkdtemp(prefix="trainctl-pg-", dir=base))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._names = itertools.count()
        self._spare: list[str] = []  # emptied databases, ready for reuse
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    # ------------------------------------------------------------- lifecycle

    def _run(self, *args: str, timeout: float = 60) -> None:
        kw = {}
        if self.user is not None:
            kw = dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC",
               "HOME": str(self.root)}
        proc = subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True, text=True,
                              env=env, cwd=self.root, timeout=timeout, **kw)
        if proc.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{log}")

    def start(self) -> "PostgresServer":
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                  "--locale=C", "--no-sync", "--no-instructions")
        conf = self.data / "postgresql.conf"
        base_conf = conf.read_text()
        for attempt in range(3):  # another process may take the free port before we bind it
            self.port = _free_port()
            settings = {**_SETTINGS, "port": str(self.port)}
            conf.write_text(base_conf + "\n# trainctl tests\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
                return self
            except RuntimeError:
                if attempt == 2 or "could not bind" not in (self.log.read_text() if self.log.exists() else ""):
                    raise
        return self

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                # immediate: no checkpoint, the data is thrown away next.
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------- databases

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        """A psycopg connection as the superuser, in autocommit mode."""
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=database,
                               autocommit=True, connect_timeout=10)

    def create_database(self) -> tuple[str, str]:
        """An empty database: (name, SQLAlchemy URL). Reuses one given back by `release_database`."""
        if self._spare:
            name = self._spare.pop()
        else:
            name = f"t{next(self._names)}_{uuid.uuid4().hex[:6]}"
            with self.connect() as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
        return name, self.url(name)

    def release_database(self, name: str) -> None:
        """Empty the database for the next test; drop it if that fails."""
        try:
            with self.connect(name) as conn:
                # A test that failed half-way may leave connections (and their locks) behind.
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                conn.execute("DROP SCHEMA public CASCADE")
                conn.execute("CREATE SCHEMA public")
            self._spare.append(name)
        except Exception:
            self.drop_database(name)

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server():
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install the "
                    "'postgresql' package or set TRAINCTL_PG_BIN to their directory")
    pytest.importorskip("psycopg", reason="psycopg 3 not installed: pip install -e '.[postgres]'")
    server = PostgresServer(bindir)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    name, url = pg_server.create_database()
    yield url
    pg_server.release_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database on either back end (the PostgreSQL case skips where it cannot run)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trainctl.db'}"
    return request.getfixturevalue("pg_url")
