"""captured output of runs: log lines and their per-experiment bound

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

- `log_lines`: one row per line of a run's output (a submitted command's stdout and
  stderr, a spec run's Python logging, trainctl's own SYSTEM lines), keyed by
  (experiment_id, attempt, idx) as the worker numbered them: a resend is stored once.
- `log_state`: per experiment, the number of lines stored and of the oldest dropped to
  keep it bounded, and the newest dropped line's key (resends at or below it are ignored).
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "log_lines",
        sa.Column("experiment_id", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("idx", sa.BigInteger, nullable=False),
        sa.Column("stream", sa.Integer, nullable=False),
        sa.Column("wall_time", sa.Double, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("experiment_id", "attempt", "idx", name="pk_log_lines"),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.id"],
                                name="fk_log_lines_experiment_id_experiments", ondelete="CASCADE"),
    )
    op.create_table(
        "log_state",
        sa.Column("experiment_id", sa.Integer, nullable=False),
        sa.Column("stored", sa.BigInteger, nullable=False),
        sa.Column("dropped", sa.BigInteger, nullable=False),
        sa.Column("floor_attempt", sa.Integer, nullable=False),
        sa.Column("floor_idx", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("experiment_id", name="pk_log_state"),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.id"],
                                name="fk_log_state_experiment_id_experiments", ondelete="CASCADE"),
    )


def downgrade() -> None:
    op.drop_table("log_state")
    op.drop_table("log_lines")
