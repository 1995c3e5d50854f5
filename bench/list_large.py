"""List on a large table (issue 10 item 10): time per page and a full walk by page_token.

    python bench/list_large.py            # ~1 min

10,000 experiments are written straight into the store of a real `trainctl server`
process (digits specs, ~1 KB each, plus a few with a 1 MB spec, the most Submit
accepts), then List is timed through the SDK's stub: the first page, a page deep in the
table (by token), and a walk over every page. Each answer must stay under the page's
byte budget, and the walk must list every experiment once, newest first.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import Cluster, machine, median, table  # noqa: E402

from trainctl.server import listing  # noqa: E402
from trainctl.server.store import open_store  # noqa: E402
from trainctl.v1 import trainctl_pb2 as pb  # noqa: E402


def digits(name: str) -> dict:
    return {"name": name, "model": {"name": "resnet10t"}, "data": {"dataset": "digits", "batch_size": 64},
            "optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"name": "cosine", "warmup_epochs": 1},
            "loss": {"name": "cross_entropy"}, "train": {"epochs": 6, "seed": 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", type=int, default=10_000)
    ap.add_argument("--big", type=int, default=20, help="experiments with a 1 MB spec among them")
    ap.add_argument("--page", type=int, default=100)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with Cluster() as cluster:
        t0 = time.perf_counter()
        with open_store(f"sqlite:///{cluster.db_path}") as store:
            every = max(1, args.experiments // max(args.big, 1))
            for i in range(args.experiments):
                spec = digits(f"run-{i}")
                if args.big and i % every == 0:
                    spec["model"]["kwargs"] = {"note": "x" * 4000, "pad": ["y" * 4000] * 250}  # ~1 MB
                store.create_experiment(spec["name"], spec)
        fill_s = time.perf_counter() - t0
        client = cluster.client()
        call = lambda **kw: client._call("List", pb.ListRequest(limit=args.page, **kw))  # noqa: E731

        first = []
        for _ in range(5):
            t0 = time.perf_counter()
            resp = call()
            first.append(time.perf_counter() - t0)
        # A page deep in the table: the token of an id half way down.
        deep_token = listing.encode_token(args.experiments // 2)
        deep = []
        for _ in range(5):
            t0 = time.perf_counter()
            call(page_token=deep_token)
            deep.append(time.perf_counter() - t0)

        ids, token, pages, biggest, per_page = [], "", 0, 0, []
        t_walk = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            resp = call(page_token=token)
            per_page.append(time.perf_counter() - t0)
            biggest = max(biggest, resp.ByteSize())
            ids += [x.id for x in resp.experiments]
            pages += 1
            token = resp.next_page_token
            if not token:
                break
        walk_s = time.perf_counter() - t_walk
        client.close()

    ok = ids == sorted(ids, reverse=True) and len(ids) == len(set(ids)) == args.experiments
    table(["experiments", "fill s", "page size", "first page ms (median)", "deep page ms (median)",
           "walk pages", "walk s", "ms/page (median)", "ms/page (max)", "largest page MB", "every id once",
           "page budget"],
          [[args.experiments, fill_s, args.page, median(first) * 1e3, median(deep) * 1e3, pages, walk_s,
            median(per_page) * 1e3, max(per_page) * 1e3, biggest / 2**20, "yes" if ok else "NO",
            f"{listing.PAGE_BYTES / 2**20:.0f} MB {'MET' if biggest <= listing.PAGE_BYTES else 'gap'}"]],
          title=f"List on a {args.experiments:,}-experiment table ({args.big} of them with a 1 MB spec)")


if __name__ == "__main__":
    main()
