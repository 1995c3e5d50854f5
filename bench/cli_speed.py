"""CLI start-to-exit wall time of `trainctl get` and `trainctl schedule preview`.

    python bench/cli_speed.py [--rounds 15]

Each command runs as its own process (`python -m trainctl.client.cli ...`, what the
`trainctl` entry point does), against a real server with one stored experiment for
`get`; the median of --rounds runs is compared with the target (issue 11 item 15, on an
idle box): `get` <= 0.3 s, `schedule preview examples/digits.yaml` <= 1 s. It also
reports which heavy modules each command imported (torch, timm, matplotlib, sklearn,
pydantic): `get` needs none of them; the preview needs pydantic (the spec models) only.
The load average is printed: on a shared box the figures are upper bounds.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

from _common import ROOT, Cluster, median, pct, table

HEAVY = ("torch", "timm", "matplotlib", "sklearn", "pydantic", "tensorboard")
PROBE = ("import sys, runpy; sys.argv = ['trainctl', *sys.argv[1:]];\n"
         "try:\n    runpy.run_module('trainctl.client.cli', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print('HEAVY=' + ','.join(m for m in %r if m in sys.modules), file=sys.stderr)" % (HEAVY,))


def timed(args: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the process): CPU time is what load on a shared box inflates least."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "trainctl.client.cli", *args], cwd=ROOT, capture_output=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"trainctl {' '.join(args)} exited {r.returncode}: {r.stderr.decode()[-2000:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heavy_imports(args: list[str]) -> str:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True)
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("HEAVY=")]
    return (line[-1][len("HEAVY="):] or "none") if line else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    with Cluster() as c:
        with c.client() as cl:
            from _common import spec

            x = cl.submit(spec("cli-speed", steps=3))
        cases = [("trainctl get ID", ["get", str(x.id), "-s", c.address], 0.3),
                 ("trainctl schedule preview examples/digits.yaml",
                  ["schedule", "preview", "examples/digits.yaml"], 1.0)]
        for _, args, _ in cases:
            timed(args)  # warm the page cache once
        rows = []
        for name, args, target in cases:
            runs = [timed(args) for _ in range(a.rounds)]
            times, cpu = [w for w, _ in runs], [u for _, u in runs]
            m = median(times)
            rows.append([name, f"{m:.3f}", f"{min(times):.3f}", f"{pct(times, 90):.3f}", f"{median(cpu):.3f}",
                         f"{target:.1f}", f"{m / target:.2f}", "MET" if m <= target else "gap",
                         heavy_imports(args)])
    load = os.getloadavg()
    table(["command", "median s", "min s", "p90 s", "CPU s (median)", "target s", "ratio", "", "heavy imports"],
          rows, title=f"CLI wall time, {a.rounds} runs each; load average {load[0]:.2f} ({os.cpu_count()} CPUs); "
                      "the target is for an idle box, where wall ~ CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
