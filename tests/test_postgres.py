"""PostgreSQL as users deploy it, next to SQLite: a whole run through a server on
PostgreSQL, Alembic migrations on both back ends, and race-free claiming with several
servers' worth of store instances (separate processes, separate engines) on one database.

The PostgreSQL server is a throwaway one started from the installed binaries
(tests/pg.py); its cases skip, saying why, where those cannot be found.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import create_engine, inspect, text

from tests.conftest import Cluster, Proc, digits_spec
from trainctl.server.store import SchemaTooNew, SqlAlchemyStore, open_store

pytest_plugins = ["tests.pg"]  # pg_server / pg_url / db_url


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


# ---------------------------------------------------------------- URLs


def test_postgresql_url_means_psycopg3(pg_url):
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with open_store(plain) as s:
        assert s._engine.dialect.driver == "psycopg"
        assert s.url.startswith("postgresql+psycopg://")
    with open_store(pg_url.replace("postgresql+psycopg://", "postgres://")) as s:
        assert s._engine.dialect.driver == "psycopg"
    with pytest.raises(ValueError, match="unsupported database 'mysql'.*use sqlite or postgresql"):
        open_store("mysql://u:secret@h/db")


# ---------------------------------------------------------------- several servers


def _run_servers(script: str, db_url: str, n: int, timeout: float = 120) -> list[dict]:
    """Run `script` in n processes (argv: db_url, "s<i>") and return each one's last
    stdout line as JSON. A script prints "ready" once imported (and set up), then waits
    for a line on stdin: every process gets it at the same moment, so they really race."""
    procs = [subprocess.Popen([sys.executable, "-c", script, db_url, f"s{i}"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    try:
        for p in procs:
            line = p.stdout.readline()
            assert line == "ready\n", line + p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# A server starting on the database: opening the store creates or migrates its schema.
_OPENER = r"""
import json, sys
from trainctl.server.store import open_store
url, name = sys.argv[1], sys.argv[2]
print("ready", flush=True)
sys.stdin.readline()
try:
    with open_store(url) as store:
        out = {"id": store.create_experiment(name, {}).id, "errors": []}
except Exception as e:
    out = {"id": None, "errors": [repr(e)]}
print(json.dumps(out), flush=True)
"""


# ---------------------------------------------------------------- migrations


def _heads(url):
    from alembic.script import ScriptDirectory

    from trainctl.server.store.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config(url)).get_heads()


def test_alembic_upgrade_downgrade_upgrade(db_url):
    """The migrations run by hand (alembic's own env.py connection), down to nothing and
    back, and leave exactly the schema tables.py describes."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from trainctl.server.store.migrate import alembic_config
    from trainctl.server.store.tables import metadata

    cfg = alembic_config(db_url)
    command.upgrade(cfg, "head")
    from trainctl.server.store.tables import metadata as current

    schema = {*current.tables, "alembic_version"}  # every table tables.py describes
    assert _tables(db_url) == schema
    command.downgrade(cfg, "base")
    assert _tables(db_url) == {"alembic_version"}
    command.upgrade(cfg, "head")

    with open_store(db_url) as s:  # at head already: opening migrates nothing
        exp = s.create_experiment("after-migrations", {"k": [1, 2]})
        assert s.get_experiment(exp.id).spec == {"k": [1, 2]}
        with s._engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == _heads(db_url)


def test_servers_opening_an_empty_database_together_migrate_it_once(db_url):
    """Several servers starting at once on a brand-new database: one creates the schema,
    the others wait for it (advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite) and
    find it at head, instead of failing on "relation already exists"."""
    results = _run_servers(_OPENER, db_url, 4)
    assert [r["errors"] for r in results] == [[]] * 4
    assert len({r["id"] for r in results}) == 4
    with open_store(db_url) as s, s._engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == _heads(db_url)
        assert sorted(e.name for e in s.list_experiments()) == ["s0", "s1", "s2", "s3"]


def test_newer_schema_is_refused_on_postgresql_too(pg_url):
    with open_store(pg_url) as s, s._engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0042_future'"))
    with pytest.raises(SchemaTooNew, match="revision 0042_future is newer"):
        open_store(pg_url)


# ---------------------------------------------------------------- claiming

# One "server": its own process, its own SqlAlchemyStore (engine, pool, in-process lock),
# claiming from two threads until the queue is empty.
_CLAIMER = r"""
import json, sys, threading
from trainctl.server.store import SqlAlchemyStore
url, name = sys.argv[1], sys.argv[2]
store = SqlAlchemyStore(url)
print("ready", flush=True)
sys.stdin.readline()
claimed, errors = [], []
def claim(worker_id):
    try:
        while (exp := store.claim_next(worker_id, free_gpus=0)) is not None:
            claimed.append([exp.worker_id, exp.id, exp.attempt])
    except BaseException as e:
        errors.append(repr(e))
threads = [threading.Thread(target=claim, args=(f"{name}-t{i}",)) for i in range(2)]
for t in threads: t.start()
for t in threads: t.join()
store.close()
print(json.dumps({"claimed": claimed, "errors": errors}), flush=True)
"""


def test_several_servers_claim_each_experiment_exactly_once(db_url):
    n_servers, n_experiments = 4, 120
    with open_store(db_url) as store:
        ids = [store.create_experiment(f"e{i}", {}).id for i in range(n_experiments)]
        # Needs GPUs no claimer has: must stay QUEUED, skipped by every claim.
        big = store.create_experiment("big", {}, gpus=8)

    results = _run_servers(_CLAIMER, db_url, n_servers)
    assert [r["errors"] for r in results] == [[]] * n_servers
    claimed = [c for r in results for c in r["claimed"]]
    assert sorted(id for _, id, _ in claimed) == ids  # every one, none twice
    assert sum(1 for r in results if r["claimed"]) >= 2, "the claimers never overlapped"
    with open_store(db_url) as store:
        for worker_id, id, attempt in claimed:
            exp = store.get_experiment(id)
            assert (exp.state, exp.attempt, exp.worker_id) == ("ASSIGNED", 1, worker_id) and attempt == 1
        assert store.get_experiment(big.id).state == "QUEUED"
        assert [e.id for e in store.list_experiments(states=["QUEUED"])] == [big.id]


def test_claim_skips_rows_locked_by_another_server(pg_server, pg_url):
    """claim_next really uses FOR UPDATE SKIP LOCKED on PostgreSQL: a candidate another
    server holds locked is passed over at once, not waited for."""
    with open_store(pg_url) as store:
        first = store.create_experiment("first", {})
        second = store.create_experiment("second", {})
        db = pg_url.rsplit("/", 1)[1]
        with pg_server.connect(db) as other:
            other.autocommit = False  # a transaction that keeps the row lock until rollback
            other.execute("SELECT id FROM experiments WHERE id = %s FOR UPDATE", (first.id,))
            got: list = []
            t = threading.Thread(target=lambda: got.append(store.claim_next("w1", free_gpus=0)))
            t0 = time.monotonic()
            t.start()
            t.join(10)
            waited = time.monotonic() - t0
            other.rollback()
        t.join(10)
        assert got and got[0].id == second.id, f"claim_next waited {waited:.1f} s on a locked row"
        assert waited < 5
        assert store.claim_next("w2", free_gpus=0).id == first.id  # free again after the rollback


# ---------------------------------------------------------------- end to end


class PgCluster(Cluster):
    """conftest's Cluster (one server process + workers) with the server on `db_url`."""

    def __init__(self, tmp, db_url: str):
        self.db_url = db_url
        super().__init__(tmp)

    def start_server(self, wait: bool = True) -> Proc:
        # Its own artifact store: beside a PostgreSQL URL the default is ./artifacts (the checkout).
        self.server = Proc(["server", "--listen", self._address, "--db", self.db_url,
                            "--artifacts", str(self.tmp / "artifacts")],
                           self.tmp / f"server-{time.monotonic_ns()}.log")
        return self._started(wait)


@pytest.mark.slow
def test_run_end_to_end_on_postgresql(pg_url, tmp_path):
    cluster = PgCluster(tmp_path, pg_url)
    try:
        cluster.add_worker("w0")
        with cluster.client() as c:
            x = c.submit(digits_spec("pg", epochs=1, max_steps=3, control=[{"at_step": 1, "set_lr": 0.05}]))
            final = c.wait(x.id, timeout=180)
            assert final.state == "COMPLETED", cluster.logs()
            hist = c.metrics(x.id)
            assert hist["STEP/lr"]["step"] == [0, 1, 2]
            assert hist["STEP/lr"]["value"][1] == pytest.approx(0.05, rel=1e-12)  # the scheduled set_lr
            assert len(hist["EPOCH/val_top1"]["value"]) == 1
            (ctl,) = c.controls(x.id)
            assert (ctl.status, ctl.applied_step) == ("APPLIED", 1)
    finally:
        cluster.stop()

    # What the server wrote is in PostgreSQL, readable by any other store on it.
    with open_store(pg_url) as store:
        exp = store.get_experiment(x.id)
        assert (exp.state, exp.worker_id) == ("COMPLETED", "w0") and "val_top1" in exp.summary
        series = {(s.scope, s.name): s for s in store.get_metrics(x.id)}
        assert series["STEP", "loss"].steps == [0, 1, 2]
        assert exp.last_step == max(max(s.steps) for s in series.values())
        assert store.count_metrics(x.id) == sum(len(s.steps) for s in series.values())
        assert [w.id for w in store.list_workers()] == ["w0"]
