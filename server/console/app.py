"""The console's ASGI app (Starlette): static pages, a small JSON API, SSE streams.

Security: the API takes the same client tokens as gRPC, as `Authorization: Bearer`
(the page keeps the token in the tab's sessionStorage and sends it as that header;
never a cookie, so another site cannot make the browser steer a run). Writes must be
`application/json` (a cross-site form cannot send that without a CORS preflight,
which this app never grants), and a request whose Origin is another site is refused
even with auth off.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from trainctl.server.auth import CLIENT, Tokens
from trainctl.server.console import is_loopback
from trainctl.server.console.backend import Backend, ConsoleError
from trainctl.server.console.stream import BatchCache, runs_events, run_events
from trainctl.v1 import trainctl_pb2 as pb

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024


def _error(code: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def _int(request: Request, name: str, default: int | None = None, *, path: bool = False) -> int:
    raw = (request.path_params if path else request.query_params).get(name)
    if raw is None:
        if default is None:
            raise ConsoleError("INVALID_ARGUMENT", f"{name}: required")
        return default
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ConsoleError("INVALID_ARGUMENT", f"{name}: must be an integer, got {str(raw)[:40]!r}") from None


async def _json_body(request: Request) -> dict:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ConsoleError("INVALID_ARGUMENT", "body: must be application/json")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ConsoleError("INVALID_ARGUMENT", f"body: at most {MAX_BODY} bytes, got {len(raw)}")
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise ConsoleError("INVALID_ARGUMENT", f"body: not JSON ({str(exc)[:80]})") from None
    if not isinstance(body, dict):
        raise ConsoleError("INVALID_ARGUMENT", "body: must be a JSON object")
    return body


def _loopback_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return is_loopback(name.strip("[]"))


def create_app(backend: Backend, tokens: Tokens, *, allow_remote: bool = False) -> Starlette:
    cache = BatchCache()

    def guarded(handler):
        """Auth (same tokens and roles as gRPC), same-origin check, errors as JSON."""
        async def endpoint(request: Request) -> Response:
            origin, host = request.headers.get("origin"), request.headers.get("host", "")
            if origin is not None and origin.split("://", 1)[-1] != host:
                return _error("PERMISSION_DENIED", f"cross-origin request from {origin[:100]} refused", 403)
            if not tokens.enabled and not allow_remote and not _loopback_host(host):
                # Auth off means loopback only; a page reaching us under another name is a
                # DNS-rebinding attempt (its requests look same-origin to the browser).
                return _error("PERMISSION_DENIED", f"Host {host[:100]!r} refused: with auth off the console "
                                                   f"answers only to loopback names", 403)
            if tokens.enabled:
                auth = request.headers.get("authorization", "")
                if not auth.startswith("Bearer "):
                    return _error("UNAUTHENTICATED", "missing token: enter the client token (the CLI's "
                                                     "TRAINCTL_TOKEN)", 401)
                role = tokens.role_of(auth[len("Bearer "):].strip())
                if role is None:
                    return _error("UNAUTHENTICATED", "invalid token: the server did not accept it", 401)
                if role != CLIENT:
                    return _error("PERMISSION_DENIED", f"a {role} token cannot use the console; it needs a "
                                                       f"client token", 403)
            try:
                return await handler(request)
            except ConsoleError as exc:
                return _error(exc.code, exc.message, exc.http)
        return endpoint

    async def config(request: Request) -> Response:
        # The vocabularies come from the proto (declared once there).
        return JSONResponse({"auth": tokens.enabled,
                             "states": [n for n in pb.ExperimentState.keys() if not n.endswith("UNSPECIFIED")],
                             "control_kinds": [n for n in pb.ControlKind.keys() if not n.endswith("UNSPECIFIED")]})

    async def runs(request: Request) -> Response:
        q = request.query_params
        return JSONResponse(await backend.runs(states=q.getlist("state"), tags=q.getlist("tag"),
                                               limit=_int(request, "limit", 500)))

    async def runs_stream(request: Request) -> Response:
        version = _int(request, "version", 0)
        return StreamingResponse(runs_events(backend, version), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def experiment(request: Request) -> Response:
        return JSONResponse(await backend.experiment(_int(request, "id", path=True)))

    async def history(request: Request) -> Response:
        return JSONResponse(await backend.history(_int(request, "id", path=True), _int(request, "points", 2000)))

    async def run_stream(request: Request) -> Response:
        id, points = _int(request, "id", path=True), _int(request, "points", 2000)
        sub = backend.live.hub.subscribe(id)  # before reading history: no gap
        try:
            # Both at once (two store threads): the first paint waits for the slower only.
            detail, hist = await asyncio.gather(backend.experiment(id), backend.history(id, points))
        except BaseException:
            backend.live.hub.unsubscribe(sub)
            raise
        return StreamingResponse(run_events(backend, cache, sub, detail, hist), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def control(request: Request) -> Response:
        return JSONResponse(await backend.control(_int(request, "id", path=True), await _json_body(request)))

    async def cancel(request: Request) -> Response:
        body = await _json_body(request)
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise ConsoleError("INVALID_ARGUMENT", "reason: must be a string")
        return JSONResponse(await backend.cancel(_int(request, "id", path=True), reason))

    async def annotate(request: Request) -> Response:
        return JSONResponse(await backend.annotate(_int(request, "id", path=True), await _json_body(request)))

    async def workers(request: Request) -> Response:
        return JSONResponse(await backend.workers())

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def not_found(request: Request) -> Response:
        return _error("NOT_FOUND", f"no API route {request.url.path[:100]}", 404)

    api = [
        Route("/api/config", config),  # open: tells the page whether to ask for a token
        Route("/api/runs", guarded(runs)),
        Route("/api/runs/stream", guarded(runs_stream)),
        Route("/api/workers", guarded(workers)),
        Route("/api/experiments/{id}", guarded(experiment)),
        Route("/api/experiments/{id}/history", guarded(history)),
        Route("/api/experiments/{id}/stream", guarded(run_stream)),
        Route("/api/experiments/{id}/control", guarded(control), methods=["POST"]),
        Route("/api/experiments/{id}/cancel", guarded(cancel), methods=["POST"]),
        Route("/api/experiments/{id}/annotate", guarded(annotate), methods=["POST"]),
        Route("/api/{rest:path}", not_found, methods=["GET", "POST"]),
    ]
    return Starlette(routes=[
        *api,
        Route("/", index),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
