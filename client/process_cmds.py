"""Parsers of the commands that start processes: `trainctl server`, `worker`, `demo`.

Only their arguments (and `demo`, which launches both as child processes) live here;
`cmd_server` and `cmd_worker` stay in cli.py, the one client module allowed to import
the server and the workers (tests/test_layering.py), and are passed in. Registered by
cli.build_parser through `add_parsers` and `add_demo_parser` (two calls, so the
commands keep their places in `trainctl --help`).
"""
from __future__ import annotations

import os

from trainctl.client.sdk import DEFAULT_ADDRESS


def add_parsers(sub, cmd_server, cmd_worker) -> None:
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
    s.add_argument("--artifacts", default=env("TRAINCTL_ARTIFACTS"), metavar="DIR|URL",
                   help="artifact store: a directory, or an fsspec URL such as s3://bucket/prefix "
                        "(env TRAINCTL_ARTIFACTS; default: <db dir>/artifacts for SQLite, else ./artifacts)")
    s.add_argument("--max-artifact-mb", type=int, default=env("TRAINCTL_MAX_ARTIFACT_MB") or 2048,
                   help="largest artifact one upload may store, MB (env TRAINCTL_MAX_ARTIFACT_MB; default 2048)")
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
    s.add_argument("--no-code", action="store_true",
                   help="never run submitted code (CODE experiments: a user's command, run as this worker's user); "
                        "spec runs only")
    s.set_defaults(fn=cmd_worker)


def cmd_demo(args) -> int:
    from trainctl.client.demo import run_demo

    return run_demo(spec=args.spec, port=args.port, workdir=args.workdir, set_lr=args.set_lr)


def add_demo_parser(sub) -> None:
    s = sub.add_parser("demo", help="server + worker on loopback, a digits run, an LR change mid-run")
    s.add_argument("--spec", default=None, help="spec to run (default: examples/digits.yaml)")
    s.add_argument("--port", type=int, default=0, help="0 = any free port")
    s.add_argument("--workdir", default=None, help="where the database and checkpoints go (default: a temp dir)")
    s.add_argument("--set-lr", type=float, default=0.01, help="the LR to switch to mid-run")
    s.set_defaults(fn=cmd_demo)
