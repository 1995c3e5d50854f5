"""What differs between the store's two databases, SQLite and PostgreSQL, in one place.

- URLs: `postgresql://` and `postgres://` mean psycopg 3 (`postgresql+psycopg://`).
- Engines: SQLite gets WAL, foreign keys, a busy timeout, and explicit BEGIN / BEGIN
  IMMEDIATE (see `sqlalchemy_store` for why); PostgreSQL gets pre-pinged pooled
  connections, so a server outlives a database restart.
- Upserts: `INSERT ... ON CONFLICT` is spelled the same by both, but SQLAlchemy builds
  it from each dialect's own `insert`.
- Migration lock: on PostgreSQL a transaction-scoped advisory lock serialises stores
  migrating the same database; SQLite's BEGIN IMMEDIATE already does.
"""

from __future__ import annotations

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from .tables import metrics

SUPPORTED = ("sqlite", "postgresql")

# How long a SQLite writer in another process waits for the write lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000

# Key of the advisory lock taken while migrating (any bigint; "trainctl" in ASCII).
MIGRATION_LOCK_KEY = 0x747261696E63746C


def normalize_url(url: str | URL) -> URL:
    """Parse a store URL; a PostgreSQL URL without a driver uses psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED:
        # The metrics upsert and claim_next's locking are written for these two.
        raise ValueError(
            f"unsupported database {backend!r} in {parsed.render_as_string(hide_password=True)!r}; "
            "use sqlite or postgresql"
        )
    return parsed


def is_sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


PG_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                   "keepalives_count": 3, "tcp_user_timeout": 30_000}


def make_engine(url: URL) -> Engine:
    if url.get_backend_name() == "postgresql":
        # A database host that stops answering must become StoreUnavailable (UNAVAILABLE to
        # clients, lease clock paused) in seconds, not after the kernel's TCP timeouts
        # (minutes). Settings in the URL's query (?connect_timeout=30) win over these.
        extra = {k: v for k, v in PG_CONNECT_ARGS.items() if k not in url.query}
        return create_engine(url, pool_pre_ping=True, connect_args=extra)
    kw: dict = {"connect_args": {"check_same_thread": False}}  # pooled, used from any thread
    if is_sqlite_memory(url):
        # Every connection to ":memory:" would be a different, empty database.
        kw["poolclass"] = StaticPool
    engine = create_engine(url, **kw)
    _install_sqlite_hooks(engine)
    return engine


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Take transaction control away from the sqlite3 module (which would BEGIN
        # lazily, and always DEFERRED) so the "begin" hook below decides.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fsync per checkpoint, not per commit
        cur.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        write = conn.get_execution_options().get("trainctl_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def insert(dialect: str, table):
    """The dialect's INSERT, which has `on_conflict_do_update` / `on_conflict_do_nothing`."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    return dialect_insert(table)


def metrics_upsert(dialect: str):
    stmt = insert(dialect, metrics)
    return stmt.on_conflict_do_update(
        index_elements=[metrics.c.experiment_id, metrics.c.name, metrics.c.scope, metrics.c.step],
        set_={
            "epoch": stmt.excluded.epoch,
            "value": stmt.excluded.value,
            "wall_time": stmt.excluded.wall_time,
            "attempt": stmt.excluded.attempt,
        },
        # A resumed run (later attempt) recomputed this step: its value wins. A late
        # batch from an older attempt never overwrites a newer one.
        where=stmt.excluded.attempt >= metrics.c.attempt,
    )


def lock_for_migration(conn: Connection) -> None:
    """Serialise migrating stores: call first thing in the migration's transaction.

    PostgreSQL: two servers opening one empty database at once would both see "no
    schema" and both run CREATE TABLE; the second fails ("relation already exists").
    The advisory lock makes the second wait until the first commits, then it sees the
    schema at head. Released with the transaction. SQLite: BEGIN IMMEDIATE holds the
    write lock already.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
