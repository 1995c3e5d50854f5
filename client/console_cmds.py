"""CLI verbs that came with the web console: `tag`, `note`, `compare`.

`trainctl tag ID +name -name`, `trainctl note ID "text"`, `trainctl compare 3 4 5`
(the runs side by side: state, steps, results, control count, tags, and the spec
fields that differ). Registered by cli.build_parser through `add_parsers`.
"""
from __future__ import annotations

import argparse
import json
import sys


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def spec_differences(specs: list[dict]) -> dict[str, list]:
    """{dotted key: [value in each spec]} for the keys whose values differ (name excluded)."""
    flat = [_flatten(s) for s in specs]
    keys = sorted(set().union(*flat)) if flat else []
    return {k: [f.get(k) for f in flat] for k in keys
            if k != "name" and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}


def _options_from_tags(args) -> None:
    """`tag 3 +a -b`: argparse would read -b as an option, so the tags are taken as
    REMAINDER and the real options among them (--json, --server, --token) picked out."""
    rest, tags = list(args.tags), []
    while rest:
        item = rest.pop(0)
        if item == "--json":
            args.json = True
        elif item in ("--server", "-s", "--token") and rest:
            setattr(args, "server" if item in ("--server", "-s") else "token", rest.pop(0))
        elif item.startswith(("--server=", "--token=")):
            key, _, value = item[2:].partition("=")
            setattr(args, key, value)
        else:
            tags.append(item)
    if not tags:
        raise ValueError("tag: give at least one +TAG or -TAG")
    args.tags = tags


def cmd_tag(args, client) -> int:
    _options_from_tags(args)
    add = [t[1:] if t.startswith("+") else t for t in args.tags if not t.startswith("-")]
    remove = [t[1:] for t in args.tags if t.startswith("-")]
    with client(args) as c:
        x = c.annotate(args.id, add_tags=add, remove_tags=remove)
    if args.json:
        print(json.dumps({"id": x.id, "tags": list(x.tags)}))
    else:
        print(f"experiment {x.id} tags: {' '.join(x.tags) or '(none)'}")
    return 0


def cmd_note(args, client) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    with client(args) as c:
        x = c.annotate(args.id, note=text)
    if args.json:
        print(json.dumps({"id": x.id, "note": x.note}))
    else:
        print(f"experiment {x.id} note: {x.note or '(cleared)'}")
    return 0


COMPARE_SUMMARY = ("val_top1", "best_val_top1", "train_loss", "steps")


def compare_rows(xs, controls) -> dict:
    """What `compare` prints, as data (also its --json)."""
    return {
        "experiments": [{"id": x.id, "name": x.name, "state": x.state, "last_step": x.last_step,
                         "summary": {k: x.summary.get(k) for k in COMPARE_SUMMARY},
                         "controls": len(cs), "tags": list(x.tags)} for x, cs in zip(xs, controls)],
        "spec_differences": spec_differences([x.spec for x in xs]),
    }


def cmd_compare(args, client) -> int:
    with client(args) as c:
        xs = [c.get(i) for i in args.ids]
        controls = [[r for r in c.controls(i) if r.status == "APPLIED"] for i in args.ids]
    data = compare_rows(xs, controls)
    if args.json:
        print(json.dumps(data, default=str))
        return 0
    from rich.table import Table

    from trainctl.client.render import console

    t = Table(box=None, header_style="bold")
    t.add_column("")
    for x in xs:
        t.add_column(f"{x.id} {x.name}")

    def fmt(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    exps = data["experiments"]
    t.add_row("state", *[e["state"] for e in exps])
    t.add_row("last step", *[str(e["last_step"]) for e in exps])
    for k in COMPARE_SUMMARY:
        t.add_row(k, *[fmt(e["summary"][k]) for e in exps])
    t.add_row("controls applied", *[str(e["controls"]) for e in exps])
    t.add_row("tags", *[" ".join(e["tags"]) or "—" for e in exps])
    for key, values in data["spec_differences"].items():
        t.add_row(f"[cyan]{key}[/]", *[fmt(v) for v in values])
    console.print(t)
    if not data["spec_differences"]:
        console.print("same spec (name aside)")
    return 0


def add_parsers(sub, add_conn, client) -> None:
    s = sub.add_parser("tag", help="add (+name) or remove (-name) tags of an experiment")
    s.add_argument("id", type=int)
    s.add_argument("tags", nargs=argparse.REMAINDER, metavar="+TAG|-TAG",
                   help="+name adds (a bare name too), -name removes")
    s.add_argument("--json", action="store_true")
    add_conn(s)
    s.set_defaults(fn=lambda a: cmd_tag(a, client))

    s = sub.add_parser("note", help="set the note of an experiment ('' clears it, - reads stdin)")
    s.add_argument("id", type=int)
    s.add_argument("text")
    s.add_argument("--json", action="store_true")
    add_conn(s)
    s.set_defaults(fn=lambda a: cmd_note(a, client))

    s = sub.add_parser("compare", help="experiments side by side: results, controls, tags, spec differences")
    s.add_argument("ids", type=int, nargs="+", metavar="ID")
    s.add_argument("--json", action="store_true")
    add_conn(s)
    s.set_defaults(fn=lambda a: cmd_compare(a, client))
