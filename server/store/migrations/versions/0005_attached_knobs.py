"""attached runs: experiment kind and run-token hash; knobs; controls.knob

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

- `experiments.kind`: SPEC (the built-in engine), ATTACHED (the user's own loop through
  the SDK), CODE. Existing rows are SPEC. claim_next never takes an ATTACHED run.
- `experiments.run_token_hash`: sha256 of the attached session's run token (never the
  token itself): a reconnecting SDK proves it owns the run, also after a server restart.
- `knobs`: the floats a run declared steerable, one row per (experiment, name), with
  their bounds and current value (updated from APPLIED SET_KNOB acks).
- `controls.knob`: the knob a SET_KNOB command names.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="SPEC"))
        batch.add_column(sa.Column("run_token_hash", sa.String(64), nullable=True))
    with op.batch_alter_table("controls") as batch:
        batch.add_column(sa.Column("knob", sa.String(128), nullable=False, server_default=""))
    op.create_table(
        "knobs",
        sa.Column("experiment_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("value", sa.Double, nullable=False),
        sa.Column("low", sa.Double, nullable=True),
        sa.Column("high", sa.Double, nullable=True),
        sa.PrimaryKeyConstraint("experiment_id", "name", name="pk_knobs"),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.id"],
                                name="fk_knobs_experiment_id_experiments", ondelete="CASCADE"),
    )


def downgrade() -> None:
    op.drop_table("knobs")
    with op.batch_alter_table("controls") as batch:
        batch.drop_column("knob")
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("run_token_hash")
        batch.drop_column("kind")
