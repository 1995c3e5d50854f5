"""Prometheus text endpoint of the control server (`trainctl server --metrics-port`).

Counters and the control-latency histogram are bumped by the services as things
happen. The gauges (experiments by state, connected workers, watch subscribers) are
read at scrape time instead, so they can never drift from the store or the hub.

Every server has its own registry, never prometheus_client's global one: tests and
embedders run several servers in one process. prometheus_client is the `metrics`
extra; without it the counters are no-ops and only `--metrics-port` is refused.
"""
from __future__ import annotations

import asyncio
import logging

from trainctl.server.store import entities as e
from trainctl.server.store.errors import StoreError

try:
    import prometheus_client as prom
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # the slim server image without the `metrics` extra
    prom = None

log = logging.getLogger(__name__)

# Steering is a human or a script waiting on an ack: from ~a step (ms) to a stuck run.
# Fine below 50 ms, where the target lives (p99 <= one step + 20 ms, bench/RESULTS.md).
CONTROL_BUCKETS = (0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)
SCRAPE_LOOP_TIMEOUT = 2.0


class ServerStats:
    """What the services count. Cheap enough to keep on even with no endpoint."""

    def __init__(self) -> None:
        self.registry = None
        if prom is None:
            return
        self.registry = prom.CollectorRegistry()
        self._points = prom.Counter(
            "trainctl_metric_points_ingested", "Metric values written to the store (a resent batch counts "
            "again; the store keeps one copy)", registry=self.registry)
        self._batches = prom.Counter("trainctl_metric_batches_ingested", "Metric batches written to the store",
                                     registry=self.registry)
        self._control = prom.Histogram(
            "trainctl_control_latency_seconds", "Live control commands: requested_at (stamped while the "
            "Control call is handled) to the worker's ack being stored", buckets=CONTROL_BUCKETS,
            registry=self.registry)

    def ingested(self, points: int) -> None:
        if self.registry is not None:
            self._points.inc(points)
            self._batches.inc()

    def control_resolved(self, rec: e.ControlRecord) -> None:
        # Scheduled/replayed commands wait for their step by design: not latency.
        if self.registry is not None and rec.source == e.LIVE and rec.requested_at and rec.applied_at:
            self._control.observe(max(0.0, rec.applied_at - rec.requested_at))


class _ScrapeTimeGauges:
    """A prometheus Collector reading the live state when scraped (on the HTTP thread)."""

    def __init__(self, live, dispatcher, loop: asyncio.AbstractEventLoop):
        self.live, self.dispatcher, self.loop = live, dispatcher, loop

    def collect(self):
        try:
            counts = self.live.store.count_by_state()  # one GROUP BY, not every row's spec
        except StoreError as exc:  # an outage: the other gauges still tell something
            log.warning("metrics scrape: experiment counts unavailable: %s", exc)
            counts = None
        if counts is not None:
            g = GaugeMetricFamily("trainctl_experiments", "Experiments by state", labels=["state"])
            for state in e.STATES:
                g.add_metric([state], counts.get(state, 0))
            yield g
        try:
            workers, subs, usage = asyncio.run_coroutine_threadsafe(self._loop_side(), self.loop).result(
                SCRAPE_LOOP_TIMEOUT)
        except Exception as exc:  # loop stopping or stuck: better a partial scrape than none
            log.warning("metrics scrape: live state unavailable: %s", exc)
            return
        yield GaugeMetricFamily("trainctl_workers_connected", "Workers with an open stream to this server",
                                value=workers)
        yield GaugeMetricFamily("trainctl_watch_subscribers", "Open Watch streams on this server", value=subs)
        labels = ["worker", "kind", "index"]
        util = GaugeMetricFamily("trainctl_worker_utilization_percent", "Device utilization from each connected "
                                 "worker's latest usage sample (cpu: percent of one core)", labels=labels)
        mem = GaugeMetricFamily("trainctl_worker_memory_used_bytes", "Device memory in use from each connected "
                                "worker's latest usage sample (cpu: RSS of its processes)", labels=labels)
        for worker, kind, index, utilization, used in usage:
            util.add_metric([worker, kind, str(index)], utilization)
            mem.add_metric([worker, kind, str(index)], used)
        yield util
        yield mem

    async def _loop_side(self) -> tuple[int, int, list[tuple[str, str, int, float, int]]]:
        # Hub and dispatcher are event-loop state; read them there, not from this thread.
        # Usage is what the sessions hold in memory (the latest heartbeat's), not the store.
        usage = [(s.worker_id, u.kind, u.index, u.utilization, u.memory_used_bytes)
                 for s in list(self.dispatcher.sessions.values()) for u in s.usage]
        return len(self.dispatcher.sessions), self.live.hub.subscriber_count(), usage


class MetricsEndpoint:
    """The HTTP server prometheus_client runs on a daemon thread; `stop` joins it."""

    def __init__(self, httpd, thread):
        self._httpd, self._thread = httpd, thread
        self.port: int = httpd.server_address[1]

    @classmethod
    def start(cls, host: str, port: int, live, dispatcher) -> "MetricsEndpoint":
        if live.stats.registry is None:
            # ValueError: the CLI reports it as a bad option, without a traceback.
            raise ValueError("--metrics-port needs prometheus_client: pip install 'trainctl[metrics]'")
        live.stats.registry.register(_ScrapeTimeGauges(live, dispatcher, asyncio.get_running_loop()))
        httpd, thread = prom.start_http_server(port, addr=host, registry=live.stats.registry)
        return cls(httpd, thread)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def listen_host(address: str) -> str:
    """The host part of a gRPC listen address ("[::]:50051" -> "::")."""
    host = address.rpartition(":")[0] if ":" in address else ""
    return host.strip("[]") or "0.0.0.0"
