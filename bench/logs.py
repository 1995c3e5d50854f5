"""Log shipping: a line from a submitted command's stdout to a `trainctl logs -f` client.

    python bench/logs.py [--rate 1000] [--seconds 20] [--max-seconds 5]

Real processes end to end: a `trainctl server` (SQLite file), a `trainctl worker`, a job
submitted as code (`Client.submit(job, code_dir=...)`) whose command is a child that
prints `--rate` lines a second, each carrying its `time.time()` and flushed; the worker
reads its stdout line by line into the log shipper (workers/logship.py), which batches
them onto the worker stream; the server stores them and publishes them to followers; a
`trainctl logs ID -f --json` process prints them, and this script stamps each line as it
reads it from that process. Latency = that stamp - the child's timestamp (same clock).

"Without slowing the run": the same child with stdout to /dev/null gives its achieved
rate; the ratio (through trainctl / to /dev/null) is the figure (target ~1). A second
arm runs the child unpaced for `--max-seconds` (as many lines as it can write) both
ways: the cost of the pipe and the shipper at full speed, and what reaches the store.

Target (issue 13): p99 <= 250 ms at 1,000 lines/s, ratio ~1.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from _common import ROOT, Cluster, machine, pct, table

START_DELAY_S = 5.0

CHILD = r'''
import json, sys, time
rate, seconds, delay = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
time.sleep(delay)  # the `logs -f` process has started and subscribed by then
out = sys.stdout
t0 = time.time()
i = 0
pad = "x" * 60  # ~100-byte lines
while True:
    now = time.time()
    if rate > 0:
        if i >= rate * seconds:
            break
        wait = t0 + i / rate - now
        if wait > 0:
            time.sleep(wait)
    elif now - t0 >= seconds:
        break
    out.write(f"{time.time():.6f} {i} {pad}\n")
    out.flush()
    i += 1
elapsed = time.time() - t0
print(json.dumps({"lines": i, "seconds": elapsed, "rate": i / elapsed}), file=sys.stderr, flush=True)
'''


def devnull_rate(child: Path, rate: float, seconds: float) -> dict:
    p = subprocess.run([sys.executable, str(child), str(rate), str(seconds), "0"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, check=True)
    return json.loads(p.stderr.strip().splitlines()[-1])


def through_trainctl(cluster: Cluster, code: Path, rate: float, seconds: float, name: str) -> dict:
    # The child waits START_DELAY_S before its first line, so every line is measured live
    # (not read back from the store by a follower still starting up).
    job = {"name": name, "command": f"{sys.executable} child.py {rate} {seconds} {START_DELAY_S}", "max_restarts": 0}
    with cluster.client() as c:
        x = c.submit(job, code_dir=code)
        follower = subprocess.Popen([sys.executable, "-m", "trainctl.client.cli", "logs", str(x.id), "-f", "--json",
                                     "--server", cluster.address], stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        got: list[tuple[float, dict]] = []

        def read():
            for line in follower.stdout:
                got.append((time.time(), json.loads(line)))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        final = c.wait(x.id, timeout=seconds + 300)
        follower.wait(60)
        reader.join(10)
        stored = list(c.logs(x.id))
    latencies, read_lat, printed, child = [], [], 0, None
    for at, ln in got:
        if ln["stream"] == "STDOUT":
            printed += 1
            stamp = float(ln["text"].split(" ", 1)[0])
            latencies.append(at - stamp)
            read_at = datetime.fromisoformat(ln["wall_time"].replace("Z", "+00:00")).timestamp()
            read_lat.append(read_at - stamp)  # until the worker read it from the pipe
        elif ln["stream"] == "STDERR" and ln["text"].startswith("{"):
            child = json.loads(ln["text"])
    stdout_stored = sum(1 for ln in stored if ln.stream == "STDOUT")
    dropped = [ln.text for ln in stored if ln.stream == "SYSTEM" and "dropped" in ln.text]
    return {"state": final.state, "child": child, "followed": printed, "stored": stdout_stored,
            "dropped_markers": dropped, "latency_ms": [1000 * v for v in latencies],
            "read_ms": [1000 * v for v in read_lat]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="lines a second the paced child prints")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-seconds", type=float, default=5.0, help="unpaced arm's length (0: skip it)")
    args = ap.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="trainctl-logs-bench-") as tmp:
        code = Path(tmp) / "code"
        code.mkdir()
        child = code / "child.py"
        child.write_text(CHILD)
        rows = []
        with Cluster(Path(tmp)) as cluster:
            cluster.add_worker("w-logs")
            arms = [("paced", args.rate, args.seconds)]
            if args.max_seconds > 0:
                arms.append(("unpaced", 0.0, args.max_seconds))
            for arm, rate, seconds in arms:
                base = devnull_rate(child, rate, seconds)
                r = through_trainctl(cluster, code, rate, seconds, f"logs-bench-{arm}")
                lat = r["latency_ms"]
                achieved = r["child"]["rate"] if r["child"] else float("nan")
                rows.append([arm, f"{base['rate']:.0f}", f"{achieved:.0f}", f"{achieved / base['rate']:.3f}",
                             r["child"]["lines"] if r["child"] else "?", r["followed"], r["stored"],
                             f"{pct(lat, 50):.1f}", f"{pct(lat, 99):.1f}", f"{max(lat) if lat else float('nan'):.1f}",
                             f"{pct(r['read_ms'], 50):.1f} / {pct(r['read_ms'], 99):.1f}",
                             r["state"], "; ".join(r["dropped_markers"])[:80] or "none"])
        table(["arm", "child lines/s to /dev/null", "through trainctl", "ratio", "printed",
                     "followed (logs -f)", "stored", "latency p50 ms", "p99 ms", "max ms",
                     "of which pipe->worker p50 / p99 ms", "run", "drop markers"],
                    rows, title=f"child stdout -> worker -> server -> `trainctl logs -f` ({args.rate:g} lines/s "
                                f"for {args.seconds:g} s; unpaced for {args.max_seconds:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
