"""`trainctl` command line. Address and token come from --server/--token or
TRAINCTL_SERVER / TRAINCTL_TOKEN. Every read command takes --json."""
from __future__ import annotations

import argparse
import json
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
                                        http_allow_remote=args.http_allow_remote))
    except StoreError as exc:  # e.g. a database written by a newer trainctl
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_worker(args) -> int:
    from trainctl.workers.agent import run_worker

    token = args.token or _read_token_file(args.token_file)
    return run_worker(args.server, worker_id=args.worker_id, workdir=args.workdir, max_runs=args.max_runs,
                      token=token, data_roots=args.data_root)


def _read_token_file(path: str | None) -> str | None:
    if not path:
        return None
    with open(path) as fh:  # the first non-empty line: the token this process presents
        return next((ln.strip() for ln in fh if ln.strip()), None)


# ---------------------------------------------------------------------- experiments
def cmd_submit(args) -> int:
    with _client(args) as c:
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

    with _client(args) as c:
        x, controls = c.get(args.id), c.controls(args.id)
    if args.json:
        from trainctl.client.output import jsonable

        _print_json({**jsonable(x), "controls": jsonable(controls)})
    else:
        experiment_detail(x, controls)
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


# ---------------------------------------------------------------------- schedule preview / plot
def cmd_schedule_preview(args) -> int:
    from trainctl.client.preview import preview_spec, render_text

    p = preview_spec(args.spec, steps_per_epoch=args.steps_per_epoch)
    if args.png:
        from trainctl.client.plot import preview_png

        preview_png(p, args.png)
    if args.json:
        print(json.dumps(p.to_json()))
    else:
        render_text(p)
    if args.png:
        _say(args, f"wrote {args.png}")
    return 0


def cmd_plot(args) -> int:
    from trainctl.client.plot import MAX_POINTS, experiment_png

    if len(args.ids) > 1:
        from trainctl.client.console_cmds import cmd_plot_overlay

        return cmd_plot_overlay(args, _client)
    args.id = args.ids[0]

    png = args.png or f"experiment-{args.id}.png"
    with _client(args) as c:
        x = c.get(args.id)
        series = c.metrics(args.id, max_points=MAX_POINTS)
        controls = c.controls(args.id)
    try:
        drawn = experiment_png(x, series, controls, png)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(drawn))
    else:
        print(f"wrote {png}: {', '.join(drawn['series'])}; {len(drawn['controls'])} control event(s) marked")
    return 0


def cmd_export_tb(args) -> int:
    from trainctl.client.tensorboard import export_experiment

    with _client(args) as c:
        out = export_experiment(c, args.id, args.logdir)
    if not out["points"] and not out["controls"]:
        print(f"error: experiment {args.id} has no metrics or controls stored yet: nothing to export "
              f"(state {out['state']})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
    else:
        print(f"wrote {out['logdir']}: {out['points']} points in {len(out['tags'])} series, "
              f"{out['controls']} control event(s); view with: tensorboard --logdir {args.logdir}")
    return 0


def cmd_top(args) -> int:
    from trainctl.client.dashboard import run_top, snapshots
    from trainctl.client.render import console

    with _client(args) as c:
        if args.json:
            print(json.dumps([r.to_json() for r in snapshots(c, args.ids)]))
        else:
            run_top(c, args.ids, once=args.once, console=console)
    return 0


def cmd_demo(args) -> int:
    from trainctl.client.demo import run_demo

    return run_demo(spec=args.spec, port=args.port, workdir=args.workdir, set_lr=args.set_lr)


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainctl", description="Submit, watch and steer training runs.")
    # Daemons (server, worker) log their lifecycle at INFO; client commands stay quiet.
    p.add_argument("--log-level", default=os.environ.get("TRAINCTL_LOG"),
                   help="DEBUG, INFO, WARNING, ERROR (default: INFO for server and worker, WARNING otherwise)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("server", help="run the control server")
    s.add_argument("--listen", default="127.0.0.1:50051",
                   help="host:port to serve gRPC on (default 127.0.0.1:50051; 0.0.0.0:50051 for every interface)")
    s.add_argument("--db", default=os.environ.get("TRAINCTL_DB", "sqlite:///trainctl.db"),
                   help="SQLAlchemy URL (env TRAINCTL_DB)")
    s.add_argument("--heartbeat", type=float, default=2.0, help="worker heartbeat interval, s")
    s.add_argument("--lease-timeout", type=float, default=15.0, help="requeue a run after this long without news, s")
    s.add_argument("--grace", type=float, default=10.0, help="seconds to finish in-flight work on SIGTERM")
    env = os.environ.get
    # Server-only variables: a shell that exported TRAINCTL_TOKEN for the CLI must not
    # turn auth on for a server started from it. Prefer the env/file forms: flags show in `ps`.
    s.add_argument("--client-token", default=env("TRAINCTL_SERVER_CLIENT_TOKEN"),
                   help="token clients must present (env TRAINCTL_SERVER_CLIENT_TOKEN); no token at all = auth off")
    s.add_argument("--worker-token", default=env("TRAINCTL_SERVER_WORKER_TOKEN"),
                   help="token workers must present (env TRAINCTL_SERVER_WORKER_TOKEN)")
    s.add_argument("--client-token-file", default=env("TRAINCTL_SERVER_CLIENT_TOKEN_FILE"),
                   help="file of client tokens, one a line (env TRAINCTL_SERVER_CLIENT_TOKEN_FILE)")
    s.add_argument("--worker-token-file", default=env("TRAINCTL_SERVER_WORKER_TOKEN_FILE"),
                   help="file of worker tokens, one a line (env TRAINCTL_SERVER_WORKER_TOKEN_FILE)")
    s.add_argument("--tls-cert", default=env("TRAINCTL_TLS_CERT"), help="server certificate (PEM); enables TLS")
    s.add_argument("--tls-key", default=env("TRAINCTL_TLS_KEY"), help="server private key (PEM)")
    s.add_argument("--tls-client-ca", default=env("TRAINCTL_TLS_CLIENT_CA"),
                   help="CA that client certificates must chain to (mutual TLS)")
    s.add_argument("--metrics-port", type=int, default=env("TRAINCTL_METRICS_PORT"),
                   help="serve Prometheus metrics on this port, same host as --listen (env TRAINCTL_METRICS_PORT); "
                        "default off")
    s.add_argument("--http", default=env("TRAINCTL_HTTP"), metavar="HOST:PORT",
                   help="serve the web console here, e.g. 127.0.0.1:8080 (env TRAINCTL_HTTP); default off")
    s.add_argument("--http-allow-remote", action="store_true",
                   help="with auth off, serve the console on a non-loopback address anyway")
    s.set_defaults(fn=cmd_server)

    s = sub.add_parser("worker", help="run a worker that trains assigned experiments")
    s.add_argument("--server", "-s", default=os.environ.get("TRAINCTL_SERVER", DEFAULT_ADDRESS),
                   help="server address host:port (env TRAINCTL_SERVER)")
    s.add_argument("--worker-id", default=os.environ.get("TRAINCTL_WORKER_ID"))
    s.add_argument("--workdir", default=os.environ.get("TRAINCTL_WORKDIR", "runs"), help="checkpoints go here")
    s.add_argument("--max-runs", type=int, default=0, help="exit after this many runs (0 = never)")
    s.add_argument("--token", default=os.environ.get("TRAINCTL_WORKER_TOKEN"),
                   help="worker token; prefer env TRAINCTL_WORKER_TOKEN or --token-file: a flag shows in `ps`")
    s.add_argument("--token-file", default=os.environ.get("TRAINCTL_WORKER_TOKEN_FILE"),
                   help="file holding the worker token (env TRAINCTL_WORKER_TOKEN_FILE)")
    s.add_argument("--data-root", action="append", metavar="DIR",
                   default=[r for r in os.environ.get("TRAINCTL_DATA_ROOT", "").split(os.pathsep) if r] or None,
                   help="a directory specs may read data and weights files from (repeatable; env TRAINCTL_DATA_ROOT, "
                        "':'-separated); default: the worker's current directory only")
    s.set_defaults(fn=cmd_worker)

    s = sub.add_parser("submit", help="submit a spec (YAML/JSON)")
    s.add_argument("spec")
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

    s = sub.add_parser("schedule", help="LR schedule tools")
    ssub = s.add_subparsers(dest="schedule_command", required=True, metavar="SUBCOMMAND")
    s = ssub.add_parser("preview", help="the LR at every step of a spec (controls applied), without training")
    s.add_argument("spec", help="spec file (YAML/JSON)")
    s.add_argument("--steps-per-epoch", type=int, default=None, metavar="N",
                   help="optimizer steps per epoch; default: count them from the dataset as the worker does")
    s.add_argument("--png", metavar="FILE", help="also write a plot (epochs on the x axis)")
    s.add_argument("--json", action="store_true", help='{"steps_per_epoch", "epochs", "lr": [...], ...}')
    s.set_defaults(fn=cmd_schedule_preview)

    s = sub.add_parser("plot", help="PNG of an experiment's LR, loss and accuracy with its control events "
                                    "(several IDs: overlaid)")
    s.add_argument("ids", type=int, nargs="+", metavar="ID")
    s.add_argument("--png", metavar="FILE", help="output file (default: experiment-ID.png)")
    s.add_argument("--json", action="store_true", help="print what was plotted as JSON")
    _add_conn(s)
    s.set_defaults(fn=cmd_plot)

    s = sub.add_parser("export-tb", help="write an experiment's metrics and controls as TensorBoard event files")
    s.add_argument("id", type=int)
    s.add_argument("--logdir", required=True, help="TensorBoard log dir; the run goes to LOGDIR/ID-NAME/")
    s.add_argument("--json", action="store_true", help='{"id", "logdir", "tags", "points", "controls"}')
    _add_conn(s)
    s.set_defaults(fn=cmd_export_tb)

    s = sub.add_parser("top", help="full-screen live table of several runs (default: all queued and running)")
    s.add_argument("ids", type=int, nargs="*", metavar="ID")
    s.add_argument("--once", action="store_true", help="print one frame and exit")
    s.add_argument("--json", action="store_true", help="one snapshot of every run as JSON (implies --once)")
    _add_conn(s)
    s.set_defaults(fn=cmd_top)

    s = sub.add_parser("demo", help="server + worker on loopback, a digits run, an LR change mid-run")
    s.add_argument("--spec", default=None, help="spec to run (default: examples/digits.yaml)")
    s.add_argument("--port", type=int, default=0, help="0 = any free port")
    s.add_argument("--workdir", default=None, help="where the database and checkpoints go (default: a temp dir)")
    s.add_argument("--set-lr", type=float, default=0.01, help="the LR to switch to mid-run")
    s.set_defaults(fn=cmd_demo)
    from trainctl.client import console_cmds

    console_cmds.add_parsers(sub, _add_conn, _client)
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
        if isinstance(exc, BrokenPipeError) or getattr(exc, "errno", None) == 32:
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
