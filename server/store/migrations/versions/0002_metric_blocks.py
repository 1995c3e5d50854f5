"""metric_blocks: a min/max rollup of metrics per block of 64 steps

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02

GetMetrics with max_points reads this table instead of every raw point (1,000,000
points: ~1.6 s raw, a few tens of ms from the rollup). The store keeps it exact in
add_metrics; this migration fills it for the points already stored, in one SQL
statement (window functions: SQLite >= 3.28, any supported PostgreSQL). The block size
(64 steps) is part of the data: changing it needs a migration that rebuilds the table.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BLOCK_STEPS = 64

# floor(step / 64) for any sign (both databases truncate integer division toward zero).
_BLOCK = f"CASE WHEN step >= 0 THEN step / {BLOCK_STEPS} ELSE -((-step - 1) / {BLOCK_STEPS}) - 1 END"

# Per block: the point count, the last step, the minimum point (smallest value, earliest
# step on ties) and the maximum point (largest value, earliest step on ties).
_BACKFILL = f"""
WITH p AS (
    SELECT experiment_id, name, scope, {_BLOCK} AS block, step, epoch, value FROM metrics
), ranked AS (
    SELECT experiment_id, name, scope, block, step, epoch, value,
           COUNT(*) OVER w AS n,
           MAX(step) OVER w AS last_step,
           ROW_NUMBER() OVER (PARTITION BY experiment_id, name, scope, block ORDER BY value, step) AS rmin,
           ROW_NUMBER() OVER (PARTITION BY experiment_id, name, scope, block ORDER BY value DESC, step) AS rmax
    FROM p
    WINDOW w AS (PARTITION BY experiment_id, name, scope, block)
)
INSERT INTO metric_blocks (experiment_id, name, scope, block, n, last_step,
                           min_step, min_epoch, min_value, max_step, max_epoch, max_value)
SELECT lo.experiment_id, lo.name, lo.scope, lo.block, lo.n, lo.last_step,
       lo.step, lo.epoch, lo.value, hi.step, hi.epoch, hi.value
FROM ranked lo
JOIN ranked hi ON hi.experiment_id = lo.experiment_id AND hi.name = lo.name
              AND hi.scope = lo.scope AND hi.block = lo.block AND hi.rmax = 1
WHERE lo.rmin = 1
"""


def upgrade() -> None:
    op.create_table(
        "metric_blocks",
        sa.Column("experiment_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("block", sa.BigInteger, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("last_step", sa.BigInteger, nullable=False),
        sa.Column("min_step", sa.BigInteger, nullable=False),
        sa.Column("min_epoch", sa.Integer, nullable=False),
        sa.Column("min_value", sa.Double, nullable=False),
        sa.Column("max_step", sa.BigInteger, nullable=False),
        sa.Column("max_epoch", sa.Integer, nullable=False),
        sa.Column("max_value", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("experiment_id", "name", "scope", "block", name="pk_metric_blocks"),
        sa.ForeignKeyConstraint(
            ["experiment_id"], ["experiments.id"],
            name="fk_metric_blocks_experiment_id_experiments", ondelete="CASCADE",
        ),
    )
    op.execute(_BACKFILL)


def downgrade() -> None:
    op.drop_table("metric_blocks")
