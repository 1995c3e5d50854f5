"""Web console: a 1,000,000-point run page, step-to-chart latency, cost of 20 consoles.

    python bench/console.py                 # ~5 min on a 2-core VM
    python bench/console.py --quick         # smaller everything, ~2 min

Needs Playwright and a chromium (TRAINCTL_CHROMIUM, default /usr/bin/chromium); the
browser parts are skipped with the reason otherwise.

1. Run page of a 1,000,000-point run (a synthetic worker, bench/_synth.py, stores
   250,000 steps x 4 names through the real protocol): a fresh browser page opens
   /#/run/ID; "usable" is the first chart drawn with data (navigation start to the
   first uPlot draw with points, performance.now() in the page). Median of 5 loads.
   Target <= 1 s.
2. Worker step -> point on the chart: a real worker trains; one browser page shows the
   run; at each redraw the page records now - wall_time of the oldest row it had not
   drawn yet (the worker stamps wall_time when it produces the row: batching, gRPC,
   store, hub, SSE and drawing are all inside). Target p99 <= 250 ms.
3. Cost of 20 open consoles: the same training run with no console and with 20 console
   clients (each the run page's stream and the runs-table stream: what 20 browser tabs
   ask of the server; the browsers themselves would be on other machines, so their
   drawing is not charged to this box). Rounds alternate A B B A; steps/s ratio and the
   server's extra CPU. Target: steps/s drops <= 1 %. On this shared VM one run's speed
   moves by several % from the next, so the ratio's noise is printed beside it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import PRESETS, Cluster, cpu_s, free_port, machine, median, pct, spec, table  # noqa: E402
from _synth import NAMES, SynthWorker, build_batches, tiny_spec  # noqa: E402
from overhead import Watcher, rate  # noqa: E402

CHROMIUM = os.environ.get("TRAINCTL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]


def browser_or_reason():
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        return None, "playwright is not installed"
    if not Path(CHROMIUM).exists():
        return None, f"no chromium at {CHROMIUM}"
    return sync_playwright, ""


async def _read_stream(url: str, counts: list) -> None:
    """One console stream, read in big chunks (the browser would be on another machine:
    only the server's side of it is charged to this box)."""
    host, _, rest = url.removeprefix("http://").partition("/")
    h, _, port = host.partition(":")
    reader, writer = await asyncio.open_connection(h, int(port))
    writer.write(f"GET /{rest} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    while True:
        chunk = await reader.read(1 << 16)
        if not chunk:
            return
        counts[0] += chunk.count(b"data: ")


def clients_main(urls: list[str]) -> None:
    """`console.py --clients URL...`: hold these streams open until killed; prints the
    number of SSE messages read on SIGTERM."""
    import signal

    os.nice(19)  # stand-ins for browsers on other machines: never ahead of the training
    counts = [0]

    async def run():
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        tasks = [asyncio.create_task(_read_stream(u, counts)) for u in urls]
        await stop.wait()
        for t in tasks:
            t.cancel()

    asyncio.run(run())
    print(counts[0], flush=True)


def page_load_times(sync_playwright, url: str, n: int) -> list[float]:
    out = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for _ in range(n):
            ctx = b.new_context(viewport={"width": 1400, "height": 1000})
            page = ctx.new_page()
            page.goto(url)
            page.wait_for_function("() => window.__console.firstDraw !== undefined", timeout=60_000)
            out.append(page.evaluate("window.__console.firstDraw") / 1000)
            marks = page.evaluate("window.__console.marks")
            print("  page marks (ms from navigation): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(marks.items(), key=lambda kv: kv[1])), flush=True)
            ctx.close()
        b.close()
    return out


async def big_run(cluster: Cluster, points: int) -> tuple[int, float]:
    client = cluster.client()
    x = client.submit(tiny_spec("console-1M"))
    w = SynthWorker(cluster.address, "synth-console")
    await w.start()
    rows = points // len(NAMES)
    batches = build_batches(w.exp_id, w.attempt, 0, rows, 1000)
    t0 = time.perf_counter()
    await w.send_acked(batches)
    load_s = time.perf_counter() - t0
    await w.finish()
    client.close()
    return x.id, load_s


def train_arm(cluster: Cluster, sd: dict, consoles: int, http: str, browser_url: str | None, sync_playwright):
    """One training run with `consoles` SSE consoles (and optionally one real page)."""
    client = cluster.client()
    x = client.submit(sd)
    w = Watcher(client, x.id)  # the step times (every arm has this one watcher)
    w.start()
    clients = None
    if consoles:
        urls = [http + path for _ in range(consoles)
                for path in (f"/api/experiments/{x.id}/stream?points=2000", "/api/runs/stream?version=0")]
        clients = subprocess.Popen([sys.executable, __file__, "--clients", *urls], stdout=subprocess.PIPE, text=True)
    lat = []
    s0 = cpu_s(cluster.server.pid)
    if browser_url is not None:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{browser_url}/#/run/{x.id}")
            w.join(900)
            lat = page.evaluate("window.__console.latencies")
            b.close()
    w.join(900)
    server_cpu = cpu_s(cluster.server.pid) - s0
    messages, client_cpu = 0, 0.0
    if clients is not None:
        client_cpu = cpu_s(clients.pid)
        clients.send_signal(signal.SIGTERM)
        messages = int(clients.communicate(timeout=30)[0].strip() or 0)
    client.close()
    if w.error or w.final is None or w.final.state != "COMPLETED":
        raise RuntimeError(f"run {x.id} did not complete: {w.error or w.final}")
    times = [r[1] for r in w.rows]
    seconds = times[-1] - times[0]
    return {"rate": rate(times, max(3, len(times) // 10)), "lat": lat, "server_cpu_per_s": server_cpu / seconds,
            "messages": messages, "client_cpu": client_cpu}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--clients":
        clients_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3000, help="training steps per arm (parts 2 and 3)")
    ap.add_argument("--rounds", type=int, default=2, help="A B B A rounds of part 3")
    ap.add_argument("--consoles", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.points, args.loads, args.steps, args.rounds = 200_000, 3, 1200, 1
    print(f"machine: {machine()}")
    sync_playwright, why = browser_or_reason()
    http_port = free_port()
    http = f"http://127.0.0.1:{http_port}"
    with Cluster(server_args=["--http", f"127.0.0.1:{http_port}"]) as cluster:
        # 1. a 1,000,000-point run page
        exp_id, load_s = asyncio.run(big_run(cluster, args.points))
        if sync_playwright is None:
            print(f"part 1 and 2 skipped: {why}")
        else:
            t = page_load_times(sync_playwright, f"{http}/#/run/{exp_id}", args.loads)
            print()
            table(["points", "load s", "loads", "median s", "max s", "target <= 1 s"],
                  [[args.points, load_s, len(t), median(t), max(t), "MET" if median(t) <= 1 else "gap"]],
                  title="Run page of a large run: navigation to first chart drawn")

        # 2 + 3. a real worker
        cluster.add_worker("bench-console", threads=1)
        sd = spec("console-train", steps=args.steps, **PRESETS["small"])
        train_arm(cluster, spec("warm", steps=20, **PRESETS["small"]), 0, http, None, None)  # warm-up
        if sync_playwright is not None:
            out = train_arm(cluster, sd, 0, http, http, sync_playwright)
            lat = out["lat"]
            print()
            table(["draws", "p50 ms", "p90 ms", "p99 ms", "max ms", "target p99 <= 250 ms"],
                  [[len(lat), pct(lat, 50) * 1e3, pct(lat, 90) * 1e3, pct(lat, 99) * 1e3,
                    (max(lat) if lat else float("nan")) * 1e3, "MET" if lat and pct(lat, 99) <= 0.25 else "gap"]],
                  title="Worker step -> point on the chart (one open run page, real worker)")
        res = {0: [], args.consoles: []}
        cpu = {0: [], args.consoles: []}
        msgs, ccpu = 0, 0.0
        for r in range(args.rounds):
            for n in ([0, args.consoles, args.consoles, 0] if r % 2 == 0 else [args.consoles, 0, 0, args.consoles]):
                out = train_arm(cluster, sd, n, http, None, None)
                res[n].append(out["rate"])
                cpu[n].append(out["server_cpu_per_s"])
                msgs, ccpu = max(msgs, out["messages"]), max(ccpu, out["client_cpu"])
        base, many = median(res[0]), median(res[args.consoles])
        noise = (max(res[0]) - min(res[0])) / base * 100
        print()
        table(["arm", "runs", "steps/s (median)", "server CPU s/s", "SSE messages / run", "clients' CPU s / run"],
              [["no console", len(res[0]), base, median(cpu[0]), 0, 0.0],
               [f"{args.consoles} consoles", len(res[args.consoles]), many, median(cpu[args.consoles]), msgs, ccpu]],
              title="Training speed with open consoles")
        drop = (1 - many / base) * 100
        print(f"\nsteps/s change with {args.consoles} consoles: {-drop:+.2f} % (no-console runs spread "
              f"{noise:.1f} %); target drop <= 1 %: {'MET' if drop <= 1 else 'gap'}")


if __name__ == "__main__":
    main()
