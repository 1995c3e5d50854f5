"""`trainctl metrics`: stored series as a table, JSON (nested by lowercase scope) or
CSV with each point's wall time.

GetMetrics series carry no wall times (MetricSeries has steps, epochs, values), so the
CSV joins them with the rows of the Watch history, which do (`Client.history`).
"""
from __future__ import annotations

import csv
import json
import sys
from typing import Optional

from trainctl.client.output import cli_value, epoch_number, iso, print_table
from trainctl.client.sdk import Client

SERIES_COLUMNS = (("SERIES", 9), ("POINTS", 6), ("FIRST STEP", 3), ("LAST STEP", 5), ("LAST", 8), ("MIN", 4),
                  ("MAX", 4))


class MissingSeries(ValueError):
    pass


def split_key(key: str) -> tuple[str, str]:
    """"STEP/loss" (the SDK's key) -> ("step", "loss")."""
    scope, name = key.split("/", 1)
    return scope.lower(), name


def check_names(c: Client, id: int, scope: Optional[str], names: Optional[list[str]],
                series: dict) -> None:
    """Every requested name must exist; else MissingSeries naming what does."""
    if not names:
        return
    found = {split_key(k)[1] for k in series}
    missing = [n for n in names if n not in found]
    if not missing:
        return
    stored = c.metrics(id, scope=scope, max_points=1)  # names only: one point per series
    have = sorted(f"{sc}/{n}" for sc, n in map(split_key, stored))
    where = f" (scope {scope})" if scope else ""
    raise MissingSeries(f"--names: experiment {id} has no series {', '.join(missing)}{where}; "
                        + (f"stored: {', '.join(have)}" if have else "it has no metrics stored yet"))


def nested(series: dict) -> dict:
    """{"step": {"loss": {"step": [...], "epoch": [...], "value": [...]}}, "epoch": {...}}
    with epoch numbers (1-based) as everywhere in the CLI."""
    out: dict[str, dict] = {}
    for key, s in series.items():
        scope, name = split_key(key)
        out.setdefault(scope, {})[name] = {"step": s["step"], "epoch": [epoch_number(e) for e in s["epoch"]],
                                           "value": [cli_value(name, v) if v == v and abs(v) != float("inf")
                                                     else None for v in s["value"]]}
    return out


def wall_times(c: Client, id: int, from_step: int) -> dict[tuple[str, int], float]:
    return {(ev.kind, ev.step): ev.wall_time for ev in c.history(id, from_step=from_step)
            if ev.kind in ("step", "epoch")}


def write_csv(c: Client, id: int, series: dict, from_step: int, out=None) -> None:
    w = csv.writer(out or sys.stdout)
    w.writerow(["scope", "name", "step", "epoch", "wall_time", "value"])
    times = wall_times(c, id, from_step) if series else {}
    for key, s in series.items():
        scope, name = split_key(key)
        for step, epoch, value in zip(s["step"], s["epoch"], s["value"]):
            w.writerow([scope, name, step, epoch_number(epoch), iso(times.get((scope, step))) or "",
                        repr(cli_value(name, value))])


def run_metrics(c: Client, args) -> int:
    names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names else None
    series = c.metrics(args.id, scope=args.scope, names=names, from_step=args.from_step, to_step=args.to_step,
                       max_points=args.max_points)
    try:
        check_names(c, args.id, args.scope, names, series)
    except MissingSeries as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(nested(series), allow_nan=False))
    elif args.csv:
        write_csv(c, args.id, series, args.from_step)
    else:
        from trainctl.client.render import console

        if not series:
            print(f"experiment {args.id} has no metrics stored yet", file=sys.stderr)
            return 0
        rows = []
        for key, s in series.items():
            v = s["value"]
            if v:
                scope, name = split_key(key)
                v = [cli_value(name, x) for x in v]
                rows.append([f"{scope}/{name}", str(len(v)), str(s["step"][0]), str(s["step"][-1]), f"{v[-1]:.6g}",
                             f"{min(v):.6g}", f"{max(v):.6g}"])
        print_table(console, SERIES_COLUMNS, rows, justify={c: "right" for c, _ in SERIES_COLUMNS[1:]})
    return 0
