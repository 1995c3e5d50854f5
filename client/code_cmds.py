"""CLI verbs for submitted code and the artifact store: `submit --code` (its packing and
upload step), `artifacts`, `download`, `gc`. Registered by cli.build_parser through
`add_parsers`; the SDK calls behind them are in code_sdk.py.
"""
from __future__ import annotations

import contextlib
import sys
import time

from trainctl.client.output import isatty as _isatty
from trainctl.codepack import DEFAULT_MAX_BYTES, human

ARTIFACT_COLUMNS = (("NAME", 9), ("KIND", 8), ("STEP", 7), ("SIZE", 8), ("ATTEMPT", 4), ("SHA256", 5),
                    ("CREATED", 3))


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool):
    """A rich progress bar on stderr (only on a terminal: a pipe or log gets no bar);
    yields the (done, total) callback artifact_io takes, or None."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from trainctl.client.render import err_console

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


# ---------------------------------------------------------------------- submit --code
def load_job(args) -> dict:
    from trainctl.spec import SpecError, load_spec_file

    data = load_spec_file(args.spec)
    if "command" not in data:
        raise SpecError([f"{args.spec}: --code needs a job spec, one with a `command` to run in the folder "
                         f"(e.g. `command: python train.py`); see docs/code.md"])
    return data


def submit_code(args, c, say):
    """Pack args.code, upload it unless the server has it, submit the job. Returns the
    ExperimentInfo; `say` prints a line for people (stderr under --json)."""
    from trainctl.client.code_sdk import submit_with_code

    job = load_job(args)
    max_bytes = int(args.max_code_mb * 1024 * 1024)
    with progress_bar("uploading code", _isatty(sys.stderr)) as progress:
        x, up = submit_with_code(c, job, args.code, max_bytes=max_bytes, progress=progress)
    if up.uploaded:
        rate = up.size / up.upload_s / 1e6 if up.upload_s > 0 else float("inf")
        say(f"code: {up.files} files, {human(up.size)}, sha256 {up.sha256[:12]}: uploaded in "
            f"{up.upload_s:.2f} s ({rate:.3g} MB/s)")
    else:
        say(f"code: {up.files} files, {human(up.size)}, sha256 {up.sha256[:12]}: unchanged, "
            f"the server has it already (not uploaded)")
    return x


def add_submit_options(s) -> None:
    s.add_argument("--code", metavar="DIR", default=None,
                   help="run the job spec's `command` on this folder: packed (.gitignore and .trainctlignore "
                        "honoured, .git/ skipped), uploaded once per content, run by a worker. "
                        "Submitting code means running it on the workers")
    s.add_argument("--max-code-mb", type=float, default=DEFAULT_MAX_BYTES / 1024 / 1024, metavar="N",
                   help="refuse a code folder over N MB (default 50)")


# ---------------------------------------------------------------------- artifacts / download / gc
def cmd_artifacts(args, client) -> int:
    from trainctl.client.output import print_table
    from trainctl.client.render import console

    with client(args) as c:
        arts = c.artifacts(args.id, args.kind)
    if args.json:
        from trainctl.client.output import dumps

        print(dumps(arts))
        return 0
    if not arts:
        console.print(f"experiment {args.id} has no artifacts" if args.id else "no code archives")
        return 0
    rows = [[a.name, a.kind, str(a.step) if a.kind == "checkpoint" else "-", human(a.size), str(a.attempt or "-"),
             a.sha256[:12], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.created_at)) if a.created_at else "-"]
            for a in arts]
    print_table(console, ARTIFACT_COLUMNS, rows)
    return 0


def cmd_download(args, client) -> int:
    from trainctl.client.render import err_console

    tty = _isatty(sys.stderr) and not args.json
    bars = contextlib.ExitStack()

    def progress_for(a):
        return bars.enter_context(progress_bar(f"{a.name}", tty))

    with client(args) as c, bars:
        got = c.download(args.id, args.name, args.output, progress_for=progress_for)
    if args.json:
        from trainctl.client.output import dumps

        print(dumps([{"artifact": a, "path": str(p)} for a, p in got]))
        return 0
    if not got:
        err_console.print(f"experiment {args.id} has no artifacts")
    for a, p in got:
        print(f"{p}  {human(a.size)}  sha256 {a.sha256[:12]} (checked)")
    return 0


def cmd_gc(args, client) -> int:
    with client(args) as c:
        r = c.gc(dry_run=args.dry_run)
    if args.json:
        from trainctl.client.output import dumps

        print(dumps(r))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {r['artifacts_removed']} artifact records (retention) and {r['blobs_removed']} blobs "
          f"nothing references; {'would free' if args.dry_run else 'freed'} {human(r['bytes_freed'])}")
    return 0


def add_parsers(sub, add_conn, client) -> None:
    s = sub.add_parser("artifacts", help="list an experiment's artifacts (0: the code archives)")
    s.add_argument("id", type=int)
    s.add_argument("--kind", choices=("code", "checkpoint", "file"), default=None)
    s.add_argument("--json", action="store_true")
    add_conn(s)
    s.set_defaults(fn=lambda a: cmd_artifacts(a, client))

    s = sub.add_parser("download", help="fetch an experiment's artifacts (checked against their sha256)")
    s.add_argument("id", type=int)
    s.add_argument("name", nargs="?", default=None, help="one artifact (default: all of them)")
    s.add_argument("--output", "-o", default=".", metavar="DIR", help="where to put them (default: here)")
    s.add_argument("--json", action="store_true")
    add_conn(s)
    s.set_defaults(fn=lambda a: cmd_download(a, client))

    s = sub.add_parser("gc", help="apply checkpoint retention and delete artifact blobs nothing references")
    s.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    s.add_argument("--json", action="store_true")
    add_conn(s)
    s.set_defaults(fn=lambda a: cmd_gc(a, client))
