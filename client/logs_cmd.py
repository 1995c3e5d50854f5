"""`trainctl logs ID [-f] [--tail N] [--attempt K] [--json]`: a run's captured output.

A submitted command's stdout and stderr, a spec run's Python logging, and trainctl's
own SYSTEM lines (e.g. "N earlier lines dropped" where the server's bound cut the
oldest). The text is written as it is, never through rich markup (a line of the
user's may well contain "[red]"). With several attempts, a rule marks where the next
starts. `--json`: one object per line (attempt, index, stream, wall_time, text).
Registered by cli.build_parser through `add_parser`.
"""
from __future__ import annotations

import json
import sys

from trainctl.client.output import iso


def cmd_logs(args, client) -> int:
    if args.tail < 0:
        raise ValueError(f"--tail: must be >= 0 (0: every stored line), got {args.tail}")
    if args.attempt < 0:
        raise ValueError(f"--attempt: must be >= 0 (0: every attempt), got {args.attempt}")
    out = sys.stdout
    with client(args) as c:
        attempt = None
        for line in c.logs(args.id, follow=args.follow, tail=args.tail, attempt=args.attempt):
            if args.json:
                out.write(json.dumps({"attempt": line.attempt, "index": line.index, "stream": line.stream,
                                      "wall_time": iso(line.wall_time), "text": line.text}) + "\n")
            else:
                if attempt is not None and line.attempt != attempt:
                    out.write(f"---- attempt {line.attempt} ----\n")
                attempt = line.attempt
                out.write(line.text + "\n")
            if args.follow:
                out.flush()
    return 0


def add_parser(sub, add_conn, client) -> None:
    s = sub.add_parser("logs", help="a run's output: a submitted command's stdout/stderr, a spec run's logging")
    s.add_argument("id", type=int)
    s.add_argument("--follow", "-f", action="store_true", help="then new lines as they come, until the run ends")
    s.add_argument("--tail", "-n", type=int, default=0, help="only the last N stored lines (default: all)")
    s.add_argument("--attempt", type=int, default=0, help="only this attempt's lines (default: every attempt)")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    add_conn(s)
    s.set_defaults(fn=lambda args: cmd_logs(args, client))


FAILED_TAIL = 10  # stderr lines `trainctl get` shows of a FAILED run
_SCAN = 500       # of the last attempt's stored lines, searched for them


def last_error_lines(c, x, n: int = FAILED_TAIL) -> list[str]:
    """The last `n` stderr lines of a FAILED run's last attempt (a spec run, which has
    no stderr: its last logging lines); [] when it has none or the server keeps no logs."""
    from trainctl.client.sdk import TrainctlError

    if x.state != "FAILED":
        return []
    try:
        lines = list(c.logs(x.id, tail=_SCAN, attempt=x.attempt))
    except TrainctlError:  # e.g. UNIMPLEMENTED by an older server: `get` still answers
        return []
    picked = [ln.text for ln in lines if ln.stream == "STDERR"] or \
        [ln.text for ln in lines if ln.stream == "LOGGING"]
    return picked[-n:]
