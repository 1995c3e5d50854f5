"""The web console: `trainctl server --http 127.0.0.1:8080`.

Served by uvicorn inside the gRPC server's own event loop and process, from the same
store, hub and service objects (no second source of truth). See docs/console.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket

from trainctl.server.auth import Tokens

log = logging.getLogger(__name__)


def parse_http(address: str) -> tuple[str, int]:
    """'127.0.0.1:8080' | '[::1]:8080' | ':8080' (loopback) -> (host, port); ValueError names the flag."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http: expected HOST:PORT, got {address!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Console:
    """Start with `await Console.start(...)` inside the server's loop; `await stop()`."""

    def __init__(self, server, task: asyncio.Task, backend, port: int, host: str):
        self._server, self._task, self.backend, self.port, self.host = server, task, backend, port, host

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @classmethod
    async def start(cls, address: str, *, service, live, dispatcher, tokens: Tokens,
                    allow_remote_without_auth: bool = False) -> "Console":
        import uvicorn

        from trainctl.server.console.app import create_app
        from trainctl.server.console.backend import Backend

        host, port = parse_http(address)
        if not tokens.enabled and not is_loopback(host) and not allow_remote_without_auth:
            raise ValueError(f"--http {address}: auth is off (no client token), so the console binds only to "
                             f"loopback; set --client-token, or pass --http-allow-remote to serve it anyway")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))  # here, so a taken port fails the server's start at once
        except OSError as exc:
            sock.close()
            raise OSError(f"--http {address}: cannot bind ({exc.strerror})") from None
        sock.listen(128)
        sock.setblocking(False)
        backend = Backend(service, live, dispatcher)
        config = uvicorn.Config(create_app(backend, tokens, allow_remote=allow_remote_without_auth),
                                log_level="warning", lifespan="off",
                                access_log=False, timeout_graceful_shutdown=1)
        server = _loop_server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="console")
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if task.done():
            task.result()  # raises why it could not start
        return cls(server, task, backend, sock.getsockname()[1], host)

    async def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True  # open SSE streams would otherwise hold it up to the grace
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._task, 5)
        self.backend.close()


def _loop_server(config):
    """A uvicorn server that leaves SIGTERM/SIGINT to the gRPC server (graceful stop)."""
    import uvicorn

    class LoopServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return LoopServer(config)
