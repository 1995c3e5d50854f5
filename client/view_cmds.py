"""CLI verbs that draw or export runs: `schedule preview`, `plot`, `export-tb`, `top`.

Each imports what it draws with (the spec models, matplotlib, tensorboard) only when
it runs, so `trainctl get` stays fast. Registered by cli.build_parser through
`add_parsers`, which passes cli's connection helpers in.
"""
from __future__ import annotations

import json
import sys


def cmd_schedule_preview(args, say) -> int:
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
        say(args, f"wrote {args.png}")
    return 0


def cmd_plot(args, client) -> int:
    from trainctl.client.plot import MAX_POINTS, experiment_png

    if len(args.ids) > 1:
        return cmd_plot_overlay(args, client)
    args.id = args.ids[0]

    png = args.png or f"experiment-{args.id}.png"
    with client(args) as c:
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


def cmd_plot_overlay(args, client) -> int:
    from trainctl.client.plot import MAX_POINTS, overlay_png

    png = args.png or f"experiments-{'-'.join(map(str, args.ids))}.png"
    with client(args) as c:
        xs = [c.get(i) for i in args.ids]
        metrics = [c.metrics(i, max_points=MAX_POINTS) for i in args.ids]
        controls = [c.controls(i) for i in args.ids]
    drawn = overlay_png(xs, metrics, controls, png)
    if args.json:
        print(json.dumps(drawn))
    else:
        print(f"wrote {png}: {len(xs)} experiments overlaid on {', '.join(drawn['series'])}; "
              f"{len(drawn['controls'])} control event(s) marked")
    return 0


def cmd_export_tb(args, client) -> int:
    from trainctl.client.tensorboard import export_experiment

    with client(args) as c:
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


def cmd_top(args, client) -> int:
    from trainctl.client.dashboard import run_top, snapshots
    from trainctl.client.render import console

    with client(args) as c:
        if args.json:
            print(json.dumps([r.to_json() for r in snapshots(c, args.ids)]))
        else:
            run_top(c, args.ids, once=args.once, console=console)
    return 0


def add_parsers(sub, add_conn, client, say) -> None:
    s = sub.add_parser("schedule", help="LR schedule tools")
    ssub = s.add_subparsers(dest="schedule_command", required=True, metavar="SUBCOMMAND")
    s = ssub.add_parser("preview", help="the LR at every step of a spec (controls applied), without training")
    s.add_argument("spec", help="spec file (YAML/JSON)")
    s.add_argument("--steps-per-epoch", type=int, default=None, metavar="N",
                   help="optimizer steps per epoch; default: count them from the dataset as the worker does")
    s.add_argument("--png", metavar="FILE", help="also write a plot (epochs on the x axis)")
    s.add_argument("--json", action="store_true", help='{"steps_per_epoch", "epochs", "lr": [...], ...}')
    s.set_defaults(fn=lambda args: cmd_schedule_preview(args, say))

    s = sub.add_parser("plot", help="PNG of an experiment's LR, loss and accuracy with its control events "
                                    "(several IDs: overlaid)")
    s.add_argument("ids", type=int, nargs="+", metavar="ID")
    s.add_argument("--png", metavar="FILE", help="output file (default: experiment-ID.png)")
    s.add_argument("--json", action="store_true", help="print what was plotted as JSON")
    add_conn(s)
    s.set_defaults(fn=lambda args: cmd_plot(args, client))

    s = sub.add_parser("export-tb", help="write an experiment's metrics and controls as TensorBoard event files")
    s.add_argument("id", type=int)
    s.add_argument("--logdir", required=True, help="TensorBoard log dir; the run goes to LOGDIR/ID-NAME/")
    s.add_argument("--json", action="store_true", help='{"id", "logdir", "tags", "points", "controls"}')
    add_conn(s)
    s.set_defaults(fn=lambda args: cmd_export_tb(args, client))

    s = sub.add_parser("top", help="full-screen live table of several runs (default: all queued and running)")
    s.add_argument("ids", type=int, nargs="*", metavar="ID")
    s.add_argument("--once", action="store_true", help="print one frame and exit")
    s.add_argument("--json", action="store_true", help="one snapshot of every run as JSON (implies --once)")
    add_conn(s)
    s.set_defaults(fn=lambda args: cmd_top(args, client))
