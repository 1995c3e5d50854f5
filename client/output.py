"""What the CLI writes: JSON for scripts, tables that fit, and the conventions both share.

Conventions (docs/cli.md, "Output conventions"):
* every `--json` output is JSON only on stdout (one document, or one object per line for
  streams); messages for people go to stderr;
* epochs are numbered from 1 in every CLI output, text and JSON (`epoch_number`): the
  wire, the store and the Python SDK carry the 0-based index, as they do for steps;
* times are ISO 8601 in UTC (`2026-01-02T03:04:05.678901Z`) in JSON and CSV;
* a table fits the terminal by dropping its least useful columns first and never
  wraps a row; in a pipe every value is printed in full.
"""
from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

# ExperimentInfo/ControlResult fields that hold unix seconds
TIME_FIELDS = ("created_at", "started_at", "finished_at", "requested_at", "applied_at", "wall_time")
# summary keys and metric names that hold an epoch index (the engine's best_epoch is 0-based)
EPOCH_INDEX_KEYS = ("best_epoch",)


def epoch_number(index: int) -> int:
    """The 0-based epoch index of the wire -> the epoch number people read (1-based)."""
    return int(index) + 1


def isatty(stream) -> bool:
    """Whether `stream` is a terminal (False for a closed or file-less stream)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def iso(t: Optional[float]) -> Optional[str]:
    if t is None or not math.isfinite(t) or t <= 0:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def cli_value(name: str, value):
    """A metric or summary value as the CLI shows it (epoch indexes become numbers)."""
    if name in EPOCH_INDEX_KEYS and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
        return type(value)(value + 1)
    return value


def cli_summary(summary: dict) -> dict:
    """The summary as the CLI shows it: epoch indexes as epoch numbers."""
    return {k: cli_value(k, v) for k, v in summary.items()}


def jsonable(obj: Any) -> Any:
    """SDK dataclasses -> JSON values: times as ISO 8601, summaries with epoch numbers,
    non-finite floats as null (JSON has no NaN)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name in TIME_FIELDS:
                out[f.name] = iso(v)
            elif f.name == "summary":
                out[f.name] = jsonable(cli_summary(v))
            else:
                out[f.name] = jsonable(v)
        return out
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, *, indent: Optional[int] = 2) -> str:
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


# ---------------------------------------------------------------------- tables
def fit_table(columns: Sequence[tuple[str, int]], rows: Sequence[Sequence[Any]], width: Optional[int], *,
              title: Optional[str] = None, justify: Optional[dict] = None):
    """A rich Table of `rows` under `columns` ((header, priority): lower priority goes
    first) that fits `width` characters: whole columns are dropped, lowest priority
    first, before any value is cut; rows never wrap. width None: everything, in full."""
    from rich.table import Table

    widths = [max([len(h)] + [cell_width(r[i]) for r in rows]) for i, (h, _) in enumerate(columns)]
    keep = list(range(len(columns)))
    if width is not None:
        # box=None tables pad each column with one space either side
        while len(keep) > 1 and sum(widths[i] + 2 for i in keep) > width:
            keep.remove(min(keep, key=lambda i: (columns[i][1], -i)))
    t = Table(title=title, box=None, header_style="bold", expand=False, show_edge=False)
    for i in keep:
        t.add_column(columns[i][0], no_wrap=True, overflow="ellipsis" if width is not None else "fold",
                     justify=(justify or {}).get(columns[i][0], "left"))
    for r in rows:
        t.add_row(*(r[i] for i in keep))
    return t


def cell_width(cell) -> int:
    """Characters a cell needs on one line (text, or any rich renderable)."""
    if isinstance(cell, str):
        return max((len(x) for x in cell.splitlines()), default=0)
    from rich.console import Console
    from rich.measure import Measurement

    global _MEASURE
    if _MEASURE is None:
        _MEASURE = Console(width=100_000, color_system=None)
    return Measurement.get(_MEASURE, _MEASURE.options, cell).maximum


_MEASURE = None


def table_width(console) -> Optional[int]:
    """The width a table must fit: the terminal's, or None (no limit) in a pipe."""
    return console.width if console.is_terminal else None


def print_table(console, columns, rows, **kw) -> None:
    width = table_width(console)
    t = fit_table(columns, rows, width, **kw)
    if width is None:
        # A pipe: a console as wide as the widest row, so rich neither wraps nor cuts.
        from rich.console import Console

        wide = Console(file=console.file, width=100_000, highlight=False, color_system=None, soft_wrap=True)
        wide.print(t, crop=False)
    else:
        console.print(t, crop=True)
