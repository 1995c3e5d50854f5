"""Schema migrations: the store brings its database to the Alembic head when it opens.

For developers: `alembic.command.revision(alembic_config(url), "msg", autogenerate=True)`
writes a new revision under `migrations/versions/`; `alembic.command.upgrade(cfg, "head")`
or `downgrade(cfg, "base")` run them by hand (env.py then connects to the URL itself).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from . import dialects
from .errors import SchemaTooNew

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic Config for the store's migrations (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%', which URL-encoded passwords contain.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_to_head(conn: Connection, url: str) -> None:
    """Bring the schema to head inside `conn`'s open write transaction.

    Check and upgrade happen in that one transaction, after `lock_for_migration`: two
    servers opening a fresh database at once run the migration one after the other,
    and the second finds it done. A database stamped with a revision this code does
    not know (written by a newer trainctl) is refused with SchemaTooNew.
    """
    cfg = alembic_config(url)
    script = ScriptDirectory.from_config(cfg)
    known = {rev.revision for rev in script.walk_revisions()}
    heads = script.get_heads()
    dialects.lock_for_migration(conn)
    current = MigrationContext.configure(conn).get_current_heads()
    for rev in current:
        if rev not in known:
            raise SchemaTooNew(rev, ", ".join(heads))
    if set(current) != set(heads):
        cfg.attributes["connection"] = conn  # env.py runs the upgrade on it
        command.upgrade(cfg, "head")
