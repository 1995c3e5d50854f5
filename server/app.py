"""Building, running and stopping the control server.

`create_server(address, config)` is the one factory: `trainctl server` and the tests
both use it. Graceful stop on SIGTERM: stop accepting, let in-flight calls and store
writes finish within the grace period, then close the store.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from trainctl.server.artifacts import default_location, open_blob_store, sqlite_file
from trainctl.server.artifacts.service import ArtifactsService
from trainctl.server.auth import AuthInterceptor, TlsFiles, Tokens
from trainctl.server.dispatcher import Dispatcher
from trainctl.server.guard import GuardInterceptor
from trainctl.server.experiments_service import ExperimentsService
from trainctl.server.live import Live
from trainctl.server.prometheus import MetricsEndpoint, listen_host
from trainctl.server.store import open_store
from trainctl.server.workers_service import WorkersService
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024 * 1024
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Experiments"].full_name,
    pb.DESCRIPTOR.services_by_name["Workers"].full_name,
    pb.DESCRIPTOR.services_by_name["Artifacts"].full_name,
)


@dataclass
class ServerConfig:
    db_url: str = "sqlite:///trainctl.db"
    heartbeat_interval: float = 2.0
    lease_timeout: float = 15.0
    grace: float = 10.0
    tokens: Tokens = Tokens()
    tls: TlsFiles | None = None
    metrics_port: int | None = None  # Prometheus text endpoint on the --listen host; None = off
    watch_send_timeout: float = 60.0  # a Watch whose client takes no message for this long is cut off
    http: str | None = None  # web console HOST:PORT (server/console); None = off
    http_allow_remote: bool = False  # serve the console beyond loopback even with auth off
    artifacts: str | None = None  # artifact store: a directory or fsspec URL; None = default_location(db_url)
    max_artifact_mb: int = 2048  # largest single upload


class ControlServer:
    def __init__(self, grpc_server: grpc.aio.Server, live: Live, dispatcher: Dispatcher,
                 health_servicer: health.aio.HealthServicer, config: ServerConfig, *, host: str = "127.0.0.1"):
        self.grpc = grpc_server
        self.host = host
        self.metrics: MetricsEndpoint | None = None
        self.live = live
        self.dispatcher = dispatcher
        self.health = health_servicer
        self.config = config
        self.experiments = None  # the ExperimentsService (the console calls it in-process)
        self.artifacts = None  # the ArtifactsService
        self.console = None

    async def start(self) -> None:
        if self.config.metrics_port is not None:  # first: a taken port fails before anything serves
            self.metrics = MetricsEndpoint.start(self.host, self.config.metrics_port, self.live, self.dispatcher)
        await self.dispatcher.start()
        await self.grpc.start()
        if self.config.http is not None:
            from trainctl.server.console import Console

            self.console = await Console.start(self.config.http, service=self.experiments, live=self.live,
                                               dispatcher=self.dispatcher, tokens=self.config.tokens,
                                               allow_remote_without_auth=self.config.http_allow_remote)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.console is not None:
            await self.console.stop()
            self.console = None
        if self.metrics is not None:  # before the store closes under a scrape
            self.metrics.stop()
            self.metrics = None
        await self.dispatcher.stop()
        await self.grpc.stop(self.config.grace if grace is None else grace)
        if self.artifacts is not None:
            self.artifacts.close()  # its uploads ended with the gRPC server
        self.live.close()  # waits for queued store writes
        self.live.store.close()

    async def wait(self) -> None:
        await self.grpc.wait_for_termination()


def create_server(address: str, config: ServerConfig | None = None) -> tuple[ControlServer, int]:
    """Build (not start) a server bound to `address`; returns it and the bound port
    (useful with port 0). Call inside a running event loop."""
    config = config or ServerConfig()
    store = open_store(config.db_url)
    live = Live(store)
    dispatcher = Dispatcher(live, lease_timeout=config.lease_timeout)
    # The guard first (outermost): it maps undecodable requests, store outages and
    # unexpected errors to clean statuses for every handler, the auth refusals included.
    interceptors = [GuardInterceptor(), *([AuthInterceptor(config.tokens)] if config.tokens.enabled else [])]
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ])
    experiments = ExperimentsService(live, dispatcher)
    experiments.watch_send_timeout = config.watch_send_timeout
    pb_grpc.add_ExperimentsServicer_to_server(experiments, server)
    pb_grpc.add_WorkersServicer_to_server(
        WorkersService(live, dispatcher, heartbeat_interval=config.heartbeat_interval), server)
    artifacts = ArtifactsService(live, dispatcher, open_blob_store(config.artifacts or default_location(config.db_url)),
                                 tokens=config.tokens, max_bytes=config.max_artifact_mb << 20)
    pb_grpc.add_ArtifactsServicer_to_server(artifacts, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    if config.tls is not None:
        port = server.add_secure_port(address, config.tls.server_credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    control = ControlServer(server, live, dispatcher, health_servicer, config, host=listen_host(address))
    control.experiments = experiments
    control.artifacts = artifacts
    return control, port


async def _serve(address: str, config: ServerConfig) -> None:
    server, port = create_server(address, config)
    await server.start()
    # What is loaded by now (modules, SQLAlchemy's and grpc's tables, the store) lives as
    # long as the process: frozen, it is never scanned again, so a full collection walks
    # only what came after. Unfrozen, one took ~75 ms mid-ingest: every RPC and stream
    # stood still meanwhile (it was the tail of set-lr's latency, bench/RESULTS.md).
    gc.collect()
    gc.freeze()
    log.info("trainctl server listening on %s (port %d, %s, auth %s)", address, port,
             "TLS" if config.tls else "plaintext", "on" if config.tokens.enabled else "off")
    if not config.tokens.enabled and not address.startswith(("127.", "localhost", "[::1]")):
        log.warning("no tokens configured: anyone who reaches %s can submit and steer runs", address)
    print(f"trainctl server listening on port {port}", flush=True)
    log.info("artifact store: %s (uploads up to %d MB)", server.artifacts.blobs.url, config.max_artifact_mb)
    if config.artifacts is None and sqlite_file(config.db_url) is None:
        # Beside a database server the default is wherever this process was started.
        log.warning("artifacts (checkpoints, code, outputs) are kept in %s, under the directory the server was "
                    "started in; pass --artifacts DIR|URL to keep them in one lasting place",
                    server.artifacts.blobs.url)
    if server.metrics is not None:
        print(f"prometheus metrics on http://{server.host}:{server.metrics.port}/metrics", flush=True)
    if server.console is not None:
        print(f"console on {server.console.url}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping (grace %.0f s)", config.grace)
    await server.stop()


def serve(address: str, config: ServerConfig) -> None:
    asyncio.run(_serve(address, config))
