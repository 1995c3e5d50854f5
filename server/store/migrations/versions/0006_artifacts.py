"""artifact records: code archives, checkpoints and user files of the artifact store

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

- `artifacts`: one row per named artifact, keyed by (experiment_id, name); the bytes
  live in the artifact store (server/artifacts), content-addressed by `sha256`, so many
  rows may share one blob. Code archives have experiment_id 0 and their sha256 as name
  (the same tree uploaded twice is one row), so experiment_id carries no foreign key.
  Re-uploading a name replaces its row. `step` orders checkpoints (retention keeps the
  last K per experiment); the sha256 index serves Stat by digest and garbage collection.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("experiment_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),  # "ARTIFACT_CHECKPOINT" is 19: PostgreSQL enforces it
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("experiment_id", "name", name="pk_artifacts"),
    )
    op.create_index("ix_artifacts_sha256", "artifacts", ["sha256"])
    op.create_index("ix_artifacts_experiment_id_kind_step", "artifacts", ["experiment_id", "kind", "step"])


def downgrade() -> None:
    op.drop_index("ix_artifacts_experiment_id_kind_step", table_name="artifacts")
    op.drop_index("ix_artifacts_sha256", table_name="artifacts")
    op.drop_table("artifacts")
