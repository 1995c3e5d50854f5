"""Persistence for trainctl: experiments, metrics, control records, workers.

    from trainctl.server.store import open_store
    store = open_store("sqlite:///trainctl.db")   # or postgresql+psycopg://...

The server depends on `AbstractStore`; `open_store` picks the implementation.
"""

from . import entities
from .base import AbstractStore
from .entities import (
    CONTROL_KINDS,
    CONTROL_SOURCES,
    CONTROL_STATUSES,
    FINAL_STATES,
    SCOPES,
    STATES,
    ControlRecord,
    Experiment,
    MetricRow,
    MetricSeries,
    Worker,
)
from .errors import (
    AlreadyExists,
    InvalidTransition,
    NotFound,
    SchemaTooNew,
    StaleAttempt,
    StoreError,
    StoreUnavailable,
)
from .sqlalchemy_store import SqlAlchemyStore


def open_store(url: str) -> AbstractStore:
    """Open (creating and migrating as needed) the store at a SQLAlchemy URL.

    A bare path is taken as a SQLite file, so `--db runs.db` works on the command line;
    `postgresql://` (or `postgres://`) uses psycopg 3, as `postgresql+psycopg://` does.
    """
    if "://" not in url:
        url = f"sqlite:///{url}"
    return SqlAlchemyStore(url)


__all__ = [
    "AbstractStore",
    "SqlAlchemyStore",
    "open_store",
    "entities",
    "Experiment",
    "ControlRecord",
    "MetricSeries",
    "MetricRow",
    "Worker",
    "STATES",
    "FINAL_STATES",
    "SCOPES",
    "CONTROL_KINDS",
    "CONTROL_STATUSES",
    "CONTROL_SOURCES",
    "StoreError",
    "NotFound",
    "StaleAttempt",
    "InvalidTransition",
    "SchemaTooNew",
    "AlreadyExists",
    "StoreUnavailable",
]
