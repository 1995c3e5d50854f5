"""Bearer-token roles and TLS for the server.

Two roles: a *client* token opens the Experiments service (submit, watch, control),
a *worker* token opens the Workers service (connect only). One exception: an attached
run's SDK holds a client token, so a client token may open Workers/Connect when its
Hello carries a run token; the Workers service then checks that token and lets the
session speak for that one run only (server/attach.py). Health and reflection stay
open so orchestrators can probe the server. Tokens are compared in constant time and
never logged. With no token configured at all, auth is off (loopback development).
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc

CLIENT, WORKER = "client", "worker"
ANY = "any"  # either token; the service checks each call (Artifacts: server/artifacts/service.py)
_ROLE_OF_SERVICE = {"/trainctl.v1.Experiments/": CLIENT, "/trainctl.v1.Workers/": WORKER,
                    "/trainctl.v1.Artifacts/": ANY}
CONNECT = "/trainctl.v1.Workers/Connect"


@dataclass(frozen=True)
class Tokens:
    client: tuple[str, ...] = ()
    worker: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.client or self.worker)

    def role_of(self, token: str) -> Optional[str]:
        # Check every candidate (no early exit) so timing says nothing about which matched.
        found = None
        for role, candidates in ((CLIENT, self.client), (WORKER, self.worker)):
            for cand in candidates:
                if hmac.compare_digest(token.encode(), cand.encode()) and found is None:
                    found = role
        return found

    @classmethod
    def load(cls, client: Optional[str] = None, worker: Optional[str] = None,
             client_file: Optional[str] = None, worker_file: Optional[str] = None) -> "Tokens":
        return cls(client=_collect(client, client_file), worker=_collect(worker, worker_file))


def _collect(value: Optional[str], path: Optional[str]) -> tuple[str, ...]:
    tokens = [value] if value else []
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"token file {path} does not exist")
        tokens += [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return tuple(tokens)


def bearer(metadata) -> Optional[str]:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        needed = next((role for prefix, role in _ROLE_OF_SERVICE.items() if details.method.startswith(prefix)), None)
        if needed is None:
            return await continuation(details)
        token = bearer(details.invocation_metadata)
        if token is None:
            return _refuse(await continuation(details), grpc.StatusCode.UNAUTHENTICATED,
                           "missing bearer token (authorization: Bearer <token>)")
        role = self.tokens.role_of(token)
        if role is None:
            return _refuse(await continuation(details), grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        if role == CLIENT and details.method == CONNECT:
            return _run_token_only(await continuation(details))
        if role != needed and needed != ANY:
            return _refuse(await continuation(details), grpc.StatusCode.PERMISSION_DENIED,
                           f"a {role} token cannot call {details.method}; it needs a {needed} token")
        return await continuation(details)


def _run_token_only(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """Connect for a client token: its Hello must carry a run token (which the service
    then checks against the run it names); anything else is PERMISSION_DENIED."""
    if handler is None:
        return None
    inner = handler.stream_stream

    async def connect(request_iterator, context):
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("msg") != "hello" or not first.hello.run_token:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "a client token opens Workers/Connect only for an attached run: "
                                "hello.run_token is required")

        async def replayed():
            yield first
            async for msg in request_iterator:
                yield msg

        async for out in inner(replayed(), context):
            yield out

    return grpc.stream_stream_rpc_method_handler(connect, handler.request_deserializer, handler.response_serializer)


def _refuse(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the real one that only aborts."""
    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, handler.request_deserializer, handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, handler.request_deserializer, handler.response_serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: Optional[str] = None  # set: clients must present a certificate signed by it

    def server_credentials(self) -> grpc.ServerCredentials:
        def read(path: str) -> bytes:
            p = Path(path)
            if not p.is_file():
                raise ValueError(f"TLS file {path} does not exist")
            return p.read_bytes()

        ca = read(self.client_ca) if self.client_ca else None
        return grpc.ssl_server_credentials([(read(self.key), read(self.cert))], root_certificates=ca,
                                           require_client_auth=ca is not None)
