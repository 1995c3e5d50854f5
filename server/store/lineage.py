"""What the store holds of a run, for checkpoint lineage: `delivered` answers "every
STEP row 0..S-1 and every EPOCH row of epoch 0..E-1 is stored", so a resumed attempt
knows which of its checkpoints describe work that somebody saw.

A STEP row exists at step s when any metric is stored for (STEP, s). The first missing
step is found from the rollup (`metric_blocks`, one row per series and block of
BLOCK_STEPS steps): a block in which some series has all BLOCK_STEPS points is whole,
and only the first block that is not is read raw. A 1,000,000-point run thus costs a
read of ~16,000 rollup rows and of at most a block's raw points per series, not a scan
of its points (bench/lineage.py: ~60 ms against ~870 ms for a scan of the run's
steps, on a 2-core box; it runs once per assignment, in a store thread).

EPOCH rows are few (one per epoch); their `epoch` column is the 0-based epoch index
(their `step` is the global step at the epoch's end), so the epoch prefix is read from
that column, per series through the metrics key (experiment_id, name, scope, step).
"""

from __future__ import annotations

from .series import BLOCK_STEPS


def delivered(cursor, ph: str, experiment_id: int) -> tuple[int, int]:
    """(steps, epochs): the lengths of the stored STEP-row and EPOCH-row prefixes."""
    return _steps(cursor, ph, experiment_id), _epochs(cursor, ph, experiment_id)


def _steps(cur, ph: str, experiment_id: int) -> int:
    cur.execute(f"SELECT name, block, n FROM metric_blocks WHERE experiment_id = {ph} AND scope = {ph}",
                [experiment_id, "STEP"])
    names: set[str] = set()
    whole: set[int] = set()
    for name, block, n in cur.fetchall():
        names.add(name)
        if n >= BLOCK_STEPS:  # steps are unique per series and inside the block
            whole.add(block)
    if not names:
        return 0
    block = 0
    while True:
        while block in whole:
            block += 1
        lo, hi = block * BLOCK_STEPS, block * BLOCK_STEPS + BLOCK_STEPS - 1
        present: set[int] = set()
        for name in names:  # the union of the series: a row is any metric at that step
            cur.execute(f"SELECT step FROM metrics WHERE experiment_id = {ph} AND name = {ph} AND scope = {ph} "
                        f"AND step BETWEEN {ph} AND {ph}", [experiment_id, name, "STEP", lo, hi])
            present.update(r[0] for r in cur.fetchall())
        step = lo
        while step in present:
            step += 1
        if step <= hi:
            return step
        block += 1  # whole only as a union of series (rare): go on with the next one


def _epochs(cur, ph: str, experiment_id: int) -> int:
    cur.execute(f"SELECT DISTINCT name FROM metric_blocks WHERE experiment_id = {ph} AND scope = {ph}",
                [experiment_id, "EPOCH"])
    present: set[int] = set()
    for (name,) in cur.fetchall():
        cur.execute(f"SELECT epoch FROM metrics WHERE experiment_id = {ph} AND name = {ph} AND scope = {ph}",
                    [experiment_id, name, "EPOCH"])
        present.update(r[0] for r in cur.fetchall())
    epoch = 0
    while epoch in present:
        epoch += 1
    return epoch
