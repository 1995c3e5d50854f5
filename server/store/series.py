"""Metric series for plots: the raw read path and the min/max rollup behind max_points.

Reading a long run point by point is slow however it is done: 1,000,000 points on SQLite
took ~1.5 s through SQLAlchemy rows, ~0.9 s through the driver's own cursor (`series`,
below; 0.75 s of it is SQLite's fetchall, one table lookup per row). A plot
needs ~2,000 points per series, so the store keeps a rollup, `metric_blocks`: for each
(experiment, name, scope) and block of BLOCK_STEPS consecutive steps, the point count,
the block's last step and its minimum and maximum points (smallest / largest value,
the earliest step on ties).

Writing (`Rollup.update`, called by add_metrics in its transaction, after the points
are upserted). A batch almost always appends: all its steps in a block come after the
block's stored last step, so no stored point was replaced and the block's new extremes
are the old ones merged with the batch's. Anything else (a resent batch, a resumed
attempt recomputing steps, steps out of order inside the batch) may have replaced an
extreme, so that block is recomputed from its (at most BLOCK_STEPS per series) raw
points. Either way the rollup equals what the raw points say, at every commit.

Reading (`downsampled`). The series' blocks in the range are split into groups of
consecutive blocks, (max_points - 2) // 2 groups; each group gives its minimum and
maximum points, in step order; the series' first and last points are always kept. The
first and last blocks are read raw and clipped to [from_step, to_step], so a range
need not start or end on a block boundary. A series that fits in max_points comes back
whole; one with fewer blocks than groups + 4 (under ~64,000 steps for max_points=2000)
is read raw and downsampled point by point (`downsample_minmax`), which is fast enough
there and finer than whole blocks.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.engine import Connection

from . import dialects
from .entities import MetricSeries
from .tables import metric_blocks

BLOCK_STEPS = 64  # also in migration 0002 (its backfill); changing it needs a rebuild

# Aggregate of one block, as a list (mutable, cheap): the stored columns after the key,
# in this order (first_step is only needed while merging a batch, not stored).
_N, _LAST, _MIN_STEP, _MIN_EPOCH, _MIN_VALUE, _MAX_STEP, _MAX_EPOCH, _MAX_VALUE = range(8)
_STORED = ("n", "last_step", "min_step", "min_epoch", "min_value", "max_step", "max_epoch", "max_value")
_KEY = ("experiment_id", "name", "scope", "block")


def aggregate(points) -> list | None:
    """The block aggregate of (step, epoch, value) points in step order, or None if empty."""
    agg = None
    for step, epoch, value in points:
        if agg is None:
            agg = [1, step, step, epoch, value, step, epoch, value]
            continue
        agg[_N] += 1
        agg[_LAST] = step
        if value < agg[_MIN_VALUE]:  # strict: the earliest step wins a tie
            agg[_MIN_STEP], agg[_MIN_EPOCH], agg[_MIN_VALUE] = step, epoch, value
        if value > agg[_MAX_VALUE]:
            agg[_MAX_STEP], agg[_MAX_EPOCH], agg[_MAX_VALUE] = step, epoch, value
    return agg


class Rollup:
    """Keeps `metric_blocks` in step with `metrics`; one per store (holds compiled SQL)."""

    def __init__(self, dialect: str, engine_dialect):
        self.dialect = dialect
        stmt = dialects.insert(dialect, metric_blocks)
        stmt = stmt.on_conflict_do_update(
            index_elements=[metric_blocks.c[k] for k in _KEY],
            set_={k: stmt.excluded[k] for k in _STORED},
        )
        compiled = stmt.compile(dialect=engine_dialect)
        self._upsert_sql = str(compiled)
        self._positional = compiled.positional
        if compiled.positional and list(compiled.positiontup) != list(_KEY + _STORED):
            raise RuntimeError(f"metric_blocks upsert binds {compiled.positiontup}")
        self._ph = "?" if dialect == "sqlite" else "%s"  # the driver's positional marker

    # ------------------------------------------------------------ write side

    def update(self, conn: Connection, experiment_id: int, scope: str, params: list[tuple]) -> None:
        """Fold a batch just upserted into the rollup (same transaction as the upsert).

        `params` are the batch's metric rows in the store's column order
        (experiment_id, scope, step, epoch, name, value, wall_time, attempt).
        """
        batch: dict[tuple[str, int], list] = {}  # (name, block) -> [first_step, agg, in_order]
        for _, _, step, epoch, name, value, _, _ in params:
            key = (name, step // BLOCK_STEPS)
            entry = batch.get(key)
            if entry is None:
                batch[key] = [step, [1, step, step, epoch, value, step, epoch, value], True]
                continue
            agg = entry[1]
            if step <= agg[_LAST]:
                entry[2] = False  # a repeated or earlier step: recompute this block
                continue
            agg[_N] += 1
            agg[_LAST] = step
            if value < agg[_MIN_VALUE]:
                agg[_MIN_STEP], agg[_MIN_EPOCH], agg[_MIN_VALUE] = step, epoch, value
            if value > agg[_MAX_VALUE]:
                agg[_MAX_STEP], agg[_MAX_EPOCH], agg[_MAX_VALUE] = step, epoch, value
        if not batch:
            return

        # The stored blocks the batch touches: one indexed range read, through the
        # driver (this runs for every batch, so no statement is built per call).
        names = sorted({n for n, _ in batch})
        blocks = [blk for _, blk in batch]
        ph = self._ph
        sql = (
            f"SELECT name, block, {', '.join(_STORED)} FROM metric_blocks WHERE experiment_id = {ph} "
            f"AND scope = {ph} AND name IN ({', '.join([ph] * len(names))}) AND block BETWEEN {ph} AND {ph}"
        )
        cur = conn.connection.cursor()
        try:
            cur.execute(sql, [experiment_id, scope, *names, min(blocks), max(blocks)])
            stored = {(r[0], r[1]): list(r[2:]) for r in cur.fetchall()}
        finally:
            cur.close()
        out = []
        for (name, blk), (first_step, agg, in_order) in batch.items():
            old = stored.get((name, blk))
            if in_order and old is None:
                new = agg
            elif in_order and first_step > old[_LAST]:
                new = _merge(old, agg)  # appended: no stored point was replaced
            else:
                new = self._recompute(conn, experiment_id, name, scope, blk)
            out.append((experiment_id, name, scope, blk, *new))
        if not self._positional:
            out = [dict(zip(_KEY + _STORED, row)) for row in out]
        conn.exec_driver_sql(self._upsert_sql, out)  # executemany

    def _recompute(self, conn, experiment_id, name, scope, blk) -> list:
        lo = blk * BLOCK_STEPS
        points = self._points(conn, experiment_id, name, scope, lo, lo + BLOCK_STEPS - 1)
        # The batch stored at least one point here (NaN is never stored), so never empty.
        return aggregate(points)

    # ------------------------------------------------------------ read side

    def _points(self, conn, experiment_id, name, scope, from_step, to_step) -> list[tuple]:
        """(step, epoch, value) of one series in [from_step, to_step] (None: open), through the driver."""
        ph = self._ph
        sql = (
            f"SELECT step, epoch, value FROM metrics WHERE experiment_id = {ph} AND name = {ph} "
            f"AND scope = {ph}"
        )
        args = [experiment_id, name, scope]
        if from_step is not None:
            sql += f" AND step >= {ph}"
            args.append(from_step)
        if to_step is not None:
            sql += f" AND step <= {ph}"
            args.append(to_step)
        cur = conn.connection.cursor()  # the DB-API cursor: no per-row SQLAlchemy objects
        try:
            cur.execute(sql + " ORDER BY step", args)
            return cur.fetchall()
        finally:
            cur.close()

    def _blocks(self, conn, id, scope, names, from_step, to_step):
        """Rollup rows (name, scope, block, n, ...) that may hold points in the range."""
        b = metric_blocks.c
        stmt = (
            select(b.name, b.scope, b.block, *(b[k] for k in _STORED))
            .where(b.experiment_id == id)
            .order_by(b.name, b.scope, b.block)
        )
        if from_step:
            stmt = stmt.where(b.block >= from_step // BLOCK_STEPS)
        if scope:
            stmt = stmt.where(b.scope == scope)
        if names:
            stmt = stmt.where(b.name.in_(list(names)))
        if to_step is not None:
            stmt = stmt.where(b.block <= to_step // BLOCK_STEPS)
        return conn.execute(stmt).all()

    def series(self, conn, id, scope, names, from_step, to_step) -> list[MetricSeries]:
        """Every point of each series in the range (get_metrics without downsampling)."""
        out = []
        keys = dict.fromkeys((r[0], r[1]) for r in self._blocks(conn, id, scope, names, from_step, to_step))
        for name, sc in keys:
            s = self._series(conn, id, name, sc, from_step, to_step)
            if s.steps:
                out.append(s)
        return out

    def _series(self, conn, id, name, scope, from_step, to_step) -> MetricSeries:
        rows = self._points(conn, id, name, scope, from_step or None, to_step)  # 0: from the start
        return _series_of(name, scope, rows)

    def downsampled(self, conn, id, scope, names, from_step, to_step, max_points) -> tuple[list[MetricSeries], int]:
        """(series with at most max_points (> 0) points each, total points in the range)."""
        from trainctl.server.downsample import downsample_minmax  # pure Python, no deps

        by_series: dict[tuple[str, str], list] = {}
        for r in self._blocks(conn, id, scope, names, from_step, to_step):
            by_series.setdefault((r[0], r[1]), []).append(r)
        n_groups = (max_points - 2) // 2
        out, total = [], 0
        for (name, sc), blocks in by_series.items():
            s = None
            if len(blocks) >= n_groups + 4:
                s, n = self._from_rollup(conn, id, name, sc, from_step, to_step, blocks, n_groups, max_points)
                total += n
            if s is None:
                # Few blocks, or few points: read the series raw (it is small) and
                # downsample it point by point if it does not fit.
                s = self._series(conn, id, name, sc, from_step, to_step)
                total += len(s.steps)
                if len(s.steps) > max_points:
                    epoch_of = dict(zip(s.steps, s.epochs))
                    steps, values = downsample_minmax(s.steps, s.values, max_points)
                    s = MetricSeries(s.name, s.scope, steps, [epoch_of[st] for st in steps], values)
            if s.steps:
                out.append(s)
        return out, total

    def _from_rollup(self, conn, id, name, scope, from_step, to_step, blocks, n_groups, max_points):
        """(the downsampled series, its point count); (None, 0) when it fits max_points whole."""

        def clipped(block_row) -> list[tuple]:
            lo = block_row[2] * BLOCK_STEPS
            hi = lo + BLOCK_STEPS - 1 if to_step is None else min(to_step, lo + BLOCK_STEPS - 1)
            return self._points(conn, id, name, scope, max(from_step, lo) if from_step else lo, hi)

        # Only the first and last blocks can stick out of the range; read them raw,
        # clipped. One with no point left in the range gives way to its neighbour,
        # which lies wholly inside (there are >= 4 blocks).
        blocks = list(blocks)
        head = clipped(blocks[0])
        if not head:
            blocks.pop(0)
            head = clipped(blocks[0])
        tail = clipped(blocks[-1])
        if not tail:
            blocks.pop()
            tail = clipped(blocks[-1])
        units = [aggregate(head), *(list(r[3:]) for r in blocks[1:-1]), aggregate(tail)]
        n = sum(u[_N] for u in units)
        if n <= max_points:
            return None, 0
        pts = _envelope(units, n_groups)
        first, last = head[0], tail[-1]
        if max_points == 1:
            pts = [first]
        else:
            if not pts or pts[0][0] != first[0]:
                pts.insert(0, first)
            if pts[-1][0] != last[0]:
                pts.append(last)
        return _series_of(name, scope, pts), n


def _series_of(name: str, scope: str, points: list[tuple]) -> MetricSeries:
    """A MetricSeries from (step, epoch, value) points."""
    # Three comprehensions, not zip(*points): transposing 250,000 rows through zip took
    # ~0.18 s (mostly garbage-collector passes over the big tuples), these ~0.02 s.
    return MetricSeries(name, scope, [p[0] for p in points], [p[1] for p in points], [p[2] for p in points])


def _merge(old: list, new: list) -> list:
    """Aggregate of a block whose stored points (`old`) all come before the new ones."""
    out = list(old)
    out[_N] += new[_N]
    out[_LAST] = new[_LAST]
    if new[_MIN_VALUE] < old[_MIN_VALUE]:  # a tie keeps the stored (earlier) point
        out[_MIN_STEP], out[_MIN_EPOCH], out[_MIN_VALUE] = new[_MIN_STEP], new[_MIN_EPOCH], new[_MIN_VALUE]
    if new[_MAX_VALUE] > old[_MAX_VALUE]:
        out[_MAX_STEP], out[_MAX_EPOCH], out[_MAX_VALUE] = new[_MAX_STEP], new[_MAX_EPOCH], new[_MAX_VALUE]
    return out


def _envelope(units: list[list], n_groups: int) -> list[tuple]:
    """(step, epoch, value) of each group's minimum and maximum, in step order."""
    m = len(units)
    pts = []
    for g in range(n_groups):
        group = units[g * m // n_groups : (g + 1) * m // n_groups]
        if not group:
            continue
        lo = min(group, key=lambda u: (u[_MIN_VALUE], u[_MIN_STEP]))
        hi = max(group, key=lambda u: (u[_MAX_VALUE], -u[_MAX_STEP]))
        a = (lo[_MIN_STEP], lo[_MIN_EPOCH], lo[_MIN_VALUE])
        b = (hi[_MAX_STEP], hi[_MAX_EPOCH], hi[_MAX_VALUE])
        if a[0] == b[0]:
            pts.append(a)
        else:
            pts.extend(sorted((a, b)))
    return pts
