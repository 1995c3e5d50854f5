"""Database schema: ORM models for the small tables, a Core table for metrics.

This module describes the schema the code expects; the schema itself is created and
evolved only by the Alembic migrations in `migrations/versions/`. When you change a
model here, add a migration (and keep the two in step: a test compares them).

Constraint names come from the naming convention below rather than the database's
defaults, so a later migration can drop or alter them by a name that is the same on
SQLite and PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Base(DeclarativeBase):
    metadata = metadata


class ExperimentModel(Base):
    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(256))
    # Proto enum names; short strings keep the database readable with the sqlite3 CLI.
    state: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Double)
    started_at: Mapped[float | None] = mapped_column(Double)
    finished_at: Mapped[float | None] = mapped_column(Double)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(256))
    message: Mapped[str] = mapped_column(Text, default="")
    summary: Mapped[dict] = mapped_column(JSON, default=dict)
    last_step: Mapped[int] = mapped_column(BigInteger, default=0)
    max_restarts: Mapped[int] = mapped_column(Integer, default=3)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    gpus: Mapped[int] = mapped_column(Integer, default=0)
    replay_of: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    # The user's free-text note (`trainctl note`, the console); tags are in experiment_tags.
    note: Mapped[str] = mapped_column(Text, default="", server_default="")
    # SPEC / ATTACHED / CODE (migration 0005); an ATTACHED run is never claimed.
    kind: Mapped[str] = mapped_column(String(16), default="SPEC", server_default="SPEC")
    # sha256 hex of an attached session's run token (the token itself is never stored).
    run_token_hash: Mapped[str | None] = mapped_column(String(64))
    # Loaded with the experiment in one extra query per statement (selectin), also for lists.
    tag_rows: Mapped[list["ExperimentTagModel"]] = relationship(
        lazy="selectin", order_by="ExperimentTagModel.tag", cascade="all, delete-orphan", passive_deletes=True)

    __table_args__ = (
        # claim_next scans QUEUED experiments oldest first; list filters by state.
        Index(None, "state", "id"),
    )


class ExperimentTagModel(Base):
    """One tag of one experiment (migration 0004): a row per pair, so filtering by tag
    is an index lookup on SQLite and PostgreSQL alike."""

    __tablename__ = "experiment_tags"

    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)

    __table_args__ = (Index(None, "tag", "experiment_id"),)


class ControlModel(Base):
    __tablename__ = "controls"

    # Client-chosen (or server-generated) id, scoped to its experiment (migration 0003):
    # the key that makes retries idempotent. The key's leading experiment_id also serves
    # "the commands of experiment N".
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True)
    command_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    value: Mapped[float] = mapped_column(Double)
    status: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    requested_at: Mapped[float] = mapped_column(Double)
    applied_at: Mapped[float | None] = mapped_column(Double)
    applied_step: Mapped[int | None] = mapped_column(BigInteger)
    old_value: Mapped[float | None] = mapped_column(Double)
    new_value: Mapped[float | None] = mapped_column(Double)
    message: Mapped[str] = mapped_column(Text, default="")
    at_step: Mapped[int | None] = mapped_column(BigInteger)
    consequence: Mapped[str] = mapped_column(Text, default="", server_default="")
    hold: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    knob: Mapped[str] = mapped_column(String(128), default="", server_default="")  # SET_KNOB's knob


class KnobModel(Base):
    """A float a run declared steerable (migration 0005), with its bounds and current
    value (the run's declaration, then each APPLIED SET_KNOB ack's new value)."""

    __tablename__ = "knobs"

    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[float] = mapped_column(Double)
    low: Mapped[float | None] = mapped_column(Double)
    high: Mapped[float | None] = mapped_column(Double)


class ArtifactModel(Base):
    """A named artifact of an experiment (migration 0006): its bytes are the blob
    `sha256` in the artifact store (server/artifacts), which rows may share. Code
    archives have experiment_id 0 and their sha256 as name, hence no foreign key."""

    __tablename__ = "artifacts"

    experiment_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))  # proto ArtifactKind name (PostgreSQL enforces the length)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    step: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Double)

    __table_args__ = (Index(None, "sha256"), Index(None, "experiment_id", "kind", "step"))


class MetaModel(Base):
    """Facts about the database itself (migration 0003): `store_id`, a random id made
    once when the database is created, names this store in checkpoint lineage."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class WorkerModel(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(256))
    devices: Mapped[list] = mapped_column(JSON, default=list)
    connected: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[float] = mapped_column(Double)


# Metrics are written in bulk through Core (executemany upserts) and read as columns,
# never as ORM objects, so they are a plain Table: one row per (experiment, scope,
# step, name), "long" format, so a run may log any set of names at any step.
metrics = Table(
    "metrics",
    metadata,
    Column("experiment_id", ForeignKey("experiments.id", ondelete="CASCADE"), nullable=False),
    Column("scope", String(8), nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("name", String(128), nullable=False),
    Column("value", Double, nullable=False),
    Column("wall_time", Double, nullable=False),
    # Which run wrote the point: a later attempt (resumed from a checkpoint) replaces an
    # earlier one's value for the same step, an earlier one never replaces a later one.
    Column("attempt", Integer, nullable=False),
    # The natural key is the primary key (no surrogate id): it is the upsert's conflict
    # target, and its column order (experiment, name, scope, step) is exactly the order
    # get_metrics reads series in, so that read is one index range scan, no sort.
    PrimaryKeyConstraint("experiment_id", "name", "scope", "step"),
    # Watch history / metric_rows read every name of a step range, ordered by step.
    Index(None, "experiment_id", "step"),
)


# A min/max rollup of `metrics` (see `rollup.py`): per (experiment, name, scope) and
# block of BLOCK_STEPS consecutive steps, the number of points, the block's last step and
# its minimum and maximum points. add_metrics keeps it exact in the same transaction;
# GetMetrics with max_points reads it instead of every raw point.
metric_blocks = Table(
    "metric_blocks",
    metadata,
    Column("experiment_id", ForeignKey("experiments.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("scope", String(8), nullable=False),
    Column("block", BigInteger, nullable=False),  # floor(step / BLOCK_STEPS)
    Column("n", Integer, nullable=False),
    Column("last_step", BigInteger, nullable=False),
    Column("min_step", BigInteger, nullable=False),
    Column("min_epoch", Integer, nullable=False),
    Column("min_value", Double, nullable=False),
    Column("max_step", BigInteger, nullable=False),
    Column("max_epoch", Integer, nullable=False),
    Column("max_value", Double, nullable=False),
    PrimaryKeyConstraint("experiment_id", "name", "scope", "block"),
)


# Captured output of runs (migration 0007): a submitted command's stdout/stderr, a spec
# run's Python logging. One row per line, keyed by (experiment, attempt, index) as the
# worker numbered them, so a line resent after a reconnect is stored once. Written in
# bulk and read in key order, hence a Core table like `metrics`.
log_lines = Table(
    "log_lines",
    metadata,
    Column("experiment_id", ForeignKey("experiments.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("idx", BigInteger, nullable=False),
    Column("stream", Integer, nullable=False),  # proto LogStream value
    Column("wall_time", Double, nullable=False),
    Column("text", Text, nullable=False),
    PrimaryKeyConstraint("experiment_id", "attempt", "idx"),
)


class LogStateModel(Base):
    """Per experiment (migration 0007): how many lines `log_lines` holds and how many of
    the oldest were dropped to keep it bounded; (floor_attempt, floor_idx) is the newest
    dropped line, so a late resend of a dropped line is not stored again."""

    __tablename__ = "log_state"

    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True)
    stored: Mapped[int] = mapped_column(BigInteger, default=0)
    dropped: Mapped[int] = mapped_column(BigInteger, default=0)
    floor_attempt: Mapped[int] = mapped_column(Integer, default=0)
    floor_idx: Mapped[int] = mapped_column(BigInteger, default=0)
