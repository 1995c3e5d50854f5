"""`trainctl` command line. Address and token come from --server/--token or
TRAINCTL_SERVER / TRAINCTL_TOKEN. Every read command takes --json."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from trainctl import controls
from trainctl.client.sdk import DEFAULT_ADDRESS, Client, TrainctlError


def _client(args) -> Client:
    return Client(args.server, args.token or _read_token_file(getattr(args, "token_file", None)))


def _add_conn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", "-s", default=os.environ.get("TRAINCTL_SERVER", DEFAULT_ADDRESS),
                   help="server address host:port (env TRAINCTL_SERVER)")
    p.add_argument("--token", default=os.environ.get("TRAINCTL_TOKEN"),
                   help="client token; prefer env TRAINCTL_TOKEN or --token-file: a flag shows in `ps`")
    p.add_argument("--token-file", default=os.environ.get("TRAINCTL_TOKEN_FILE"),
                   help="file holding the client token (env TRAINCTL_TOKEN_FILE)")


def _print_json(obj) -> None:
    from trainctl.client.output import dumps

    print(dumps(obj))


def _say(args, text: str) -> None:
    """A message for people: stdout in text mode, stderr under --json (stdout is JSON only)."""
    from trainctl.client.render import console, err_console

    (err_console if getattr(args, "json", False) else console).print(text)


# ---------------------------------------------------------------------- processes
def cmd_server(args) -> int:
    from trainctl.server.app import ServerConfig, serve

    from trainctl.server.auth import TlsFiles, Tokens

    tokens = Tokens.load(client=args.client_token, worker=args.worker_token,
                         client_file=args.client_token_file, worker_file=args.worker_token_file)
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    from trainctl.server.store.errors import StoreError

    try:
        serve(args.listen, ServerConfig(db_url=args.db, heartbeat_interval=args.heartbeat,
                                        lease_timeout=args.lease_timeout, grace=args.grace, tokens=tokens, tls=tls,
                                        metrics_port=args.metrics_port, http=args.http,
                                        http_allow_remote=args.http_allow_remote, artifacts=args.artifacts,
                                        max_artifact_mb=args.max_artifact_mb))
    except (StoreError, ValueError) as exc:  # e.g. a database written by a newer trainctl, a missing bucket
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_worker(args) -> int:
    from trainctl.workers.agent import run_worker

    token = args.token or _read_token_file(args.token_file)
    return run_worker(args.server, worker_id=args.worker_id, workdir=args.workdir, max_runs=args.max_runs,
                      token=token, data_roots=args.data_root, accepts_code=not args.no_code)


def _read_token_file(path: str | None) -> str | None:
    if not path:
        return None
    with open(path) as fh:  # the first non-empty line: the token this process presents
        return next((ln.strip() for ln in fh if ln.strip()), None)


# ---------------------------------------------------------------------- experiments
def cmd_submit(args) -> int:
    with _client(args) as c:
        if args.code is not None:  # the job's command on a folder: client/code_cmds.py
            from trainctl.client.code_cmds import submit_code

            x = submit_code(args, c, lambda text: _say(args, text))
        else:
            x = c.submit(args.spec)
        if args.json and not args.follow:
            _print_json(x)
            return 0
        _say(args, f"submitted experiment [bold]{x.id}[/] ({x.name}), state {x.state}")
        if not args.follow:
            return 0
        return _follow(c, x.id, args.json)


def _follow(c: Client, id: int, as_json: bool) -> int:
    from trainctl.client.render import console, event_json, live_view

    if as_json:
        last = None
        for ev in c.watch(id):
            print(event_json(ev), flush=True)
            if ev.kind == "experiment":
                last = ev.experiment
        last = last if last and last.is_final else c.get(id)
    else:
        from trainctl.client.preview import known_total_steps

        x = c.get(id)
        epochs = int(x.spec.get("train", {}).get("epochs", 0))
        total = x.summary.get("steps") if x.is_final else known_total_steps(x.spec)
        last = live_view(c.watch(id), epochs=epochs, steps_total=total or None, experiment=x,
                         controls=c.controls(id))
        last = last if last and last.is_final else c.get(id)
        style = "green" if last.state == "COMPLETED" else "bold red"
        acc = last.summary.get("val_top1")
        console.print(f"experiment {id} [{style}]{last.state}[/]"
                      + (f"  val_top1 {acc:.4f}" if acc is not None else "")
                      + (f"  ({last.message})" if last.message else ""))
    return 0 if last.state == "COMPLETED" else 1


def cmd_ls(args) -> int:
    from trainctl.client.render import print_experiments

    with _client(args) as c:
        xs = c.list(states=args.state, limit=args.limit, tags=args.tag)
    if args.json:
        _print_json(xs)
    else:
        print_experiments(xs)
    return 0


def cmd_get(args) -> int:
    from trainctl.client.render import experiment_detail

    from trainctl.client.logs_cmd import last_error_lines

    with _client(args) as c:
        x, controls = c.get(args.id), c.controls(args.id)
        last_lines = last_error_lines(c, x)  # a FAILED run's last stderr lines
    if args.json:
        from trainctl.client.output import jsonable

        extra = {"last_lines": last_lines} if last_lines else {}
        _print_json({**jsonable(x), "controls": jsonable(controls), **extra})
    else:
        experiment_detail(x, controls, last_lines)
    return 0


def cmd_watch(args) -> int:
    with _client(args) as c:
        if args.json:
            from trainctl.client.render import event_json

            for ev in c.watch(args.id, from_step=args.from_step, live_only=args.live_only):
                print(event_json(ev), flush=True)
            return 0
        return _follow(c, args.id, False)


def cmd_metrics(args) -> int:
    from trainctl.client.metrics_out import run_metrics

    with _client(args) as c:
        return run_metrics(c, args)


def _control(args, kind: str) -> int:
    from trainctl.client.render import console, control_line

    dry_run, hold = getattr(args, "dry_run", False), getattr(args, "hold", False)
    with _client(args) as c:
        r = c.control(args.id, kind, args.value, wait=args.wait, dry_run=dry_run, hold=hold,
                      knob=getattr(args, "knob", ""))
    if args.json:
        _print_json(r)
    elif dry_run:  # nothing was stored or sent: say so, then what it would do
        change = f": {r.old_value:.4g} -> {r.new_value:.4g}" if r.old_value is not None and r.new_value is not None \
            else ""
        console.print(f"{r.message}{change}" + (f"\n{r.consequence}" if r.consequence else ""), markup=False,
                      soft_wrap=True)
    else:
        console.print(control_line(r), markup=False, soft_wrap=True)  # one line, whatever the width
    return 0 if r.status not in ("REJECTED", "EXPIRED") else 1


def cmd_set_decay(args) -> int:
    return _control(args, controls.DECAY_TARGETS[args.target])


def cmd_cancel(args) -> int:
    with _client(args) as c:
        x = c.cancel(args.id, args.reason)
    if args.json:
        _print_json(x)
    else:  # cancelling is idempotent: a run that already ended is not an error
        ended = "" if x.state == "CANCELLED" else " (already ended; nothing to cancel)"
        print(f"experiment {x.id} {x.state}{ended}")
    return 0


def cmd_replay(args) -> int:
    with _client(args) as c:
        x = c.replay(args.id)
        if args.json and not args.follow:
            _print_json(x)
            return 0
        _say(args, f"replaying experiment {args.id} as experiment {x.id} ({x.name})")
        return _follow(c, x.id, args.json) if args.follow else 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainctl", description="Submit, watch and steer training runs.")
    # Daemons (server, worker) log their lifecycle at INFO; client commands stay quiet.
    p.add_argument("--log-level", default=os.environ.get("TRAINCTL_LOG"),
                   help="DEBUG, INFO, WARNING, ERROR (default: INFO for server and worker, WARNING otherwise)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from trainctl.client import process_cmds

    process_cmds.add_parsers(sub, cmd_server, cmd_worker)

    s = sub.add_parser("submit", help="submit a spec (YAML/JSON), or a job spec with --code DIR")
    s.add_argument("spec")
    from trainctl.client import code_cmds

    code_cmds.add_submit_options(s)
    s.add_argument("--follow", "-f", action="store_true", help="watch until it ends; exit 1 unless COMPLETED")
    s.add_argument("--json", action="store_true")
    _add_conn(s)
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("ls", help="list experiments")
    s.add_argument("--state", action="append", help="only these states (repeatable)")
    s.add_argument("--limit", type=int, default=None, help="at most this many (default: all, paged through)")
    s.add_argument("--tag", action="append", help="only experiments carrying this tag (repeatable: all of them)")
    s.add_argument("--json", action="store_true")
    _add_conn(s)
    s.set_defaults(fn=cmd_ls)

    s = sub.add_parser("get", help="one experiment with its control log")
    s.add_argument("id", type=int)
    s.add_argument("--json", action="store_true")
    _add_conn(s)
    s.set_defaults(fn=cmd_get)

    s = sub.add_parser("watch", help="live progress of an experiment")
    s.add_argument("id", type=int)
    s.add_argument("--from-step", type=int, default=0)
    s.add_argument("--live-only", action="store_true")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_conn(s)
    s.set_defaults(fn=cmd_watch)

    s = sub.add_parser("metrics", help="stored metrics of an experiment")
    s.add_argument("id", type=int)
    s.add_argument("--scope", choices=["step", "epoch"])
    s.add_argument("--names", help="comma-separated metric names (an unknown one is an error listing those stored)")
    s.add_argument("--from-step", type=int, default=0)
    s.add_argument("--to-step", type=int, default=0)
    s.add_argument("--max-points", type=int, default=0, help="downsample each series (min/max preserving)")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help='{"step": {"loss": {"step": [...], "epoch": [...], '
                                                         '"value": [...]}}, "epoch": {...}}')
    fmt.add_argument("--csv", action="store_true", help="scope,name,step,epoch,wall_time,value rows")
    _add_conn(s)
    s.set_defaults(fn=cmd_metrics)

    helps = {"SET_LR": "set the learning rate (the schedule keeps its shape)",
             "SCALE_LR": "multiply the learning rate"}
    for verb in (v for v in controls.VERBS if v.holds):  # set-lr, scale-lr
        kind = verb.name
        s = sub.add_parser(verb.cli, help=helps.get(kind))
        s.add_argument("id", type=int)
        s.add_argument("value", type=float)
        s.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the worker's ack")
        s.add_argument("--hold", action="store_true",
                       help="pin the LR at the value from then on (the schedule stops until a set-lr without --hold)")
        s.add_argument("--dry-run", action="store_true",
                       help="show what it would do ahead (new peak, final LR), store and send nothing")
        s.add_argument("--json", action="store_true")
        _add_conn(s)
        s.set_defaults(fn=lambda a, k=kind: _control(a, k))

    s = sub.add_parser("set-decay", help="set a decay rate: LR schedule factor, model EMA or weight decay")
    s.add_argument("id", type=int)
    s.add_argument("value", type=float)
    s.add_argument("--target", choices=list(controls.DECAY_TARGETS), default="lr")
    s.add_argument("--wait", type=float, default=10.0)
    s.add_argument("--dry-run", action="store_true", help="show what it would do ahead, store and send nothing")
    s.add_argument("--json", action="store_true")
    _add_conn(s)
    s.set_defaults(fn=cmd_set_decay)

    s = sub.add_parser("set", help="set a knob the run declared (run.knob(name, ...)) to a value")
    s.add_argument("id", type=int)
    s.add_argument("knob", metavar="name")
    s.add_argument("value", type=float)
    s.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the run's ack")
    s.add_argument("--dry-run", action="store_true", help="check name and bounds, store and send nothing")
    s.add_argument("--json", action="store_true")
    _add_conn(s)
    s.set_defaults(fn=lambda a: _control(a, controls.BY_VERB[controls.KNOB_VERB].name))

    s = sub.add_parser("cancel", help="cancel an experiment")
    s.add_argument("id", type=int)
    s.add_argument("--reason", default="")
    s.add_argument("--json", action="store_true")
    _add_conn(s)
    s.set_defaults(fn=cmd_cancel)

    s = sub.add_parser("replay", help="re-run an experiment with its spec and recorded control log")
    s.add_argument("id", type=int)
    s.add_argument("--follow", "-f", action="store_true")
    s.add_argument("--json", action="store_true")
    _add_conn(s)
    s.set_defaults(fn=cmd_replay)

    from trainctl.client import view_cmds

    view_cmds.add_parsers(sub, _add_conn, _client, _say)
    process_cmds.add_demo_parser(sub)
    from trainctl.client import console_cmds

    console_cmds.add_parsers(sub, _add_conn, _client)
    from trainctl.client import logs_cmd

    logs_cmd.add_parser(sub, _add_conn, _client)
    code_cmds.add_parsers(sub, _add_conn, _client)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or ("INFO" if args.command in ("server", "worker") else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rc = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:
        return _closed_pipe()
    except TrainctlError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # bad input files (SpecError), flags, addresses
        if getattr(exc, "errno", None) == 32:  # EPIPE raised as a plain OSError
            return _closed_pipe()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _closed_pipe() -> int:
    """The reader went away (`trainctl ls --json | head`): stop quietly, as Unix tools
    do. stdout is pointed at /dev/null so the interpreter's final flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for `yes | head`


if __name__ == "__main__":
    sys.exit(main())
