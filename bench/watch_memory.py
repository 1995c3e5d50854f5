"""Server memory under watchers that never read (issue 10 item 9).

    python bench/watch_memory.py          # ~2-3 min

A synthetic worker (real protocol, bench/_synth.py) stores a 1,000,000-point run
(250,000 steps x 4 names) in a real `trainctl server` process and completes it. Then a
separate process opens N (default 20) Watch streams from step 0, one channel each (as N
clients would), and never reads a message. The server's RSS is sampled from /proc:
before the watchers, the highest while they are open, after the server's send deadline
has cut them off (60 s without a message taken), and after the watcher process is gone.
Target: the watchers add <= 50 MB (before this fix: ~40 MB each, 963 MB for 20, because
each Watch loaded the whole history).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import Cluster, free_port, machine, rss_kb, table  # noqa: E402
from _synth import NAMES, SynthWorker, build_batches, tiny_spec  # noqa: E402

# Watchers in their own process: sync grpc, default channel options, one channel each;
# every call is started (the server begins sending) and never read.
WATCHERS = textwrap.dedent("""
    import sys, time, grpc
    from trainctl.v1 import trainctl_pb2 as pb, trainctl_pb2_grpc as pb_grpc
    address, exp, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    channels = [grpc.insecure_channel(address) for _ in range(n)]
    calls = [pb_grpc.ExperimentsStub(ch).Watch(pb.WatchRequest(id=exp)) for ch in channels]
    print("open", flush=True)
    time.sleep(3600)
""")


def mb(kb: int) -> float:
    return kb / 1024


async def amain(args) -> None:
    rows = args.points // len(NAMES)
    metrics_port = free_port()
    with Cluster(server_args=["--metrics-port", str(metrics_port)]) as cluster:
        client = cluster.client()
        client.submit(tiny_spec("watch-memory"))
        w = SynthWorker(cluster.address, "synth-watch-memory")
        await w.start()
        batches = build_batches(w.exp_id, w.attempt, 0, rows, 1000)
        t0 = time.perf_counter()
        await w.send_acked(batches)
        await w.finish()
        load_s = time.perf_counter() - t0
        pid = cluster.server.pid
        await asyncio.sleep(3)
        before = rss_kb(pid)[0]

        proc = subprocess.Popen([sys.executable, "-c", WATCHERS, cluster.address, str(w.exp_id), str(args.watchers)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stdout.readline().strip() == "open"
        t_open = time.monotonic()
        samples = []
        while time.monotonic() - t_open < args.deadline + 15:
            samples.append((time.monotonic() - t_open, rss_kb(pid)[0]))
            await asyncio.sleep(1)
            if len(samples) == 10:
                subs_open = watchers_open(metrics_port)
        during = max(kb for t, kb in samples if t < args.deadline)
        # Each stream is cut off `deadline` s after its last send went out, which under
        # load can be a while after it opened: wait for the server's gauge to say so.
        subs = watchers_open(metrics_port)
        while subs not in ("0", "-") and time.monotonic() - t_open < 4 * args.deadline:
            await asyncio.sleep(2)
            samples.append((time.monotonic() - t_open, rss_kb(pid)[0]))
            subs = watchers_open(metrics_port)
        cut_s = time.monotonic() - t_open
        after_deadline = samples[-1][1]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        await asyncio.sleep(5)
        after_cancel = rss_kb(pid)[0]
        client.close()

    added = mb(during - before)
    print()
    table(["points", "load s", "watchers", "RSS before MB", "max while open MB", "added MB", "per watcher MB",
           "all cut off after s", "RSS then MB", "streams open then", "after cancel MB", "target",
           "ratio to target"],
          [[args.points, load_s, f"{args.watchers} ({subs_open} open)", mb(before), mb(during), added,
            added / args.watchers, cut_s, mb(after_deadline), subs, mb(after_cancel), "<= 50 MB added", added / 50.0]],
          title=f"Server RSS with {args.watchers} watchers that never read "
                f"({'MET' if added <= 50 else 'gap'})")
    print("\nRSS every 5 s while open (s, MB): " + ", ".join(f"{t:.0f}:{mb(kb):.0f}" for t, kb in samples[::5]))


def watchers_open(metrics_port: int) -> str:
    """The server's own count of open Watch streams (its Prometheus gauge)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found = re.search(r"^trainctl_watch_subscribers (\S+)", text, re.M)
    return f"{float(found.group(1)):.0f}" if found else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--watchers", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=60.0, help="the server's Watch send deadline (seconds)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
