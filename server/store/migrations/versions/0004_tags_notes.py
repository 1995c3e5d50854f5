"""tags and a note per experiment

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Tags live in their own table, one row per (experiment, tag), so `ls --tag a --tag b`
is an indexed lookup on both databases (no JSON functions, which SQLite and PostgreSQL
spell differently). The note is a column: one per experiment, read with it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # server_default fills the rows that exist already (SQLite cannot add a NOT NULL
    # column without one).
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("note", sa.Text, nullable=False, server_default=""))
    op.create_table(
        "experiment_tags",
        sa.Column("experiment_id", sa.Integer, nullable=False),
        sa.Column("tag", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("experiment_id", "tag", name="pk_experiment_tags"),
        sa.ForeignKeyConstraint(
            ["experiment_id"], ["experiments.id"],
            name="fk_experiment_tags_experiment_id_experiments", ondelete="CASCADE",
        ),
    )
    # "Which experiments carry tag T" (ls --tag) reads this index.
    op.create_index("ix_experiment_tags_tag_experiment_id", "experiment_tags", ["tag", "experiment_id"])


def downgrade() -> None:
    op.drop_index("ix_experiment_tags_tag_experiment_id", table_name="experiment_tags")
    op.drop_table("experiment_tags")
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("note")
