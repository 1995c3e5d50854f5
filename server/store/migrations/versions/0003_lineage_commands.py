"""store identity (meta.store_id); command ids scoped per experiment; consequence, hold

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

- `meta`: key/value facts about the database. `store_id` is a random id made once, here
  (a database created before this revision gets one on upgrade): workers namespace
  checkpoints by it, so a fresh database over an old work directory never resumes
  another store's experiment 1 from its files.
- `controls`: the key becomes (experiment_id, command_id). A client-chosen id names one
  command of one experiment; the same id on another experiment is another command.
  The old single-column index on experiment_id is the key's prefix now, so it goes.
- `controls.consequence` (what the command means ahead, from the ack) and
  `controls.hold` (SET_LR/SCALE_LR pinning the LR).
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_meta"),
    )
    op.execute(sa.text("INSERT INTO meta (key, value) VALUES ('store_id', :v)").bindparams(v=uuid.uuid4().hex))

    op.drop_index("ix_controls_experiment_id", table_name="controls")
    # SQLite cannot change a primary key in place: batch mode copies the table.
    with op.batch_alter_table("controls", recreate="auto") as batch:
        batch.add_column(sa.Column("consequence", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("hold", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.drop_constraint("pk_controls", type_="primary")
        batch.create_primary_key("pk_controls", ["experiment_id", "command_id"])


def downgrade() -> None:
    # Fails (duplicate key) if two experiments use the same command id: that history
    # cannot be expressed in the old schema.
    with op.batch_alter_table("controls", recreate="auto") as batch:
        batch.drop_constraint("pk_controls", type_="primary")
        batch.create_primary_key("pk_controls", ["command_id"])
        batch.drop_column("hold")
        batch.drop_column("consequence")
    op.create_index("ix_controls_experiment_id", "controls", ["experiment_id"])
    op.drop_table("meta")
