"""Alembic environment for the trainctl store.

The store runs migrations itself on open (`SqlAlchemyStore._migrate`) and hands its own
connection, already inside a write transaction, through
`config.attributes["connection"]`; that way the revision check and the upgrade happen
in one transaction and two processes opening the same new database cannot both try to
create it. Without that attribute (a developer running `alembic` by hand with a Config
from `alembic_config(url)`) it connects to `sqlalchemy.url` itself.
"""

from alembic import context
from sqlalchemy import create_engine

from trainctl.server.store.tables import metadata

config = context.config


def _configure(**kw) -> None:
    context.configure(
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode lets later migrations
        # use op.batch_alter_table() and have Alembic copy the table for them.
        render_as_batch=True,
        **kw,
    )


def run_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
