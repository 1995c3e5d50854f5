"""The server's error boundary: one interceptor around every RPC.

What a client gets and what the log shows when a call fails for a reason the service
did not answer itself:
- a request body that does not decode (random bytes, a truncated message): the
  deserializer is wrapped so the failure reaches the handler as INVALID_ARGUMENT
  instead of grpc's UNKNOWN with a traceback at ERROR per call;
- `StoreUnavailable` (database locked, disk full, connection lost) anywhere in a
  handler: UNAVAILABLE with the store's readable message, never the driver's text;
- any other exception: INTERNAL "internal error in <method>; see the server log",
  with one log line, the traceback at most once per distinct raising site.

Every log line here goes through `RateLimitedLog`: a client sending junk in a loop
costs one line per minute, with the count of the calls it stands for.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
import traceback

import grpc
from google.protobuf.message import DecodeError

from trainctl.server.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0


class RateLimitedLog:
    """At most one line per key every `every` seconds; the next line says how many were
    held back meanwhile."""

    def __init__(self, logger: logging.Logger, every: float = LOG_EVERY_S):
        self.logger, self.every = logger, every
        self._last: dict[object, float] = {}
        self._held: dict[object, int] = {}
        self._lock = threading.Lock()
        self.max_keys = 10_000  # junk with ever-new keys must not grow this without bound

    def __call__(self, level: int, key: object, msg: str, *args) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            if len(self._last) >= self.max_keys:
                self._last.clear()
                self._held.clear()
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            msg += f" ({held} more like it in the last {self.every:.0f} s not logged)"
        self.logger.log(level, msg, *args)
        return True


rate_limited = RateLimitedLog(log)


async def bad_request(context, method: str, message: str, *, level: int = logging.INFO) -> None:
    """Answer INVALID_ARGUMENT with `message` (which names the field) and log it, rate-limited.
    A user's typo is INFO; a malformed message (a broken or hostile client) WARNING."""
    rate_limited(level, ("bad", method, level), "bad request to %s: %s", method, message[:300])
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


class _Undecodable:
    """Stands in for a request whose bytes did not decode; the handler wrapper answers it."""

    def __init__(self, type_name: str, error: Exception):
        self.type_name, self.error = type_name, error

    def message(self) -> str:
        return f"request: not a valid {self.type_name} message ({self.error})"[:300]


def _tolerant(deserializer):
    if deserializer is None:
        return None
    name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = name.full_name if name is not None else "request"

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError) as exc:
            return _Undecodable(type_name, exc)
    return deserialize


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Install first (outermost) so it also covers the other interceptors' handlers."""

    def __init__(self):
        self._traced: set[tuple] = set()  # raising sites whose traceback is logged already

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        des = _tolerant(handler.request_deserializer)
        ser = handler.response_serializer
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream, method, True), des, ser)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream, method, False), des, ser)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, method, True), des, ser)
        return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method, False), des, ser)

    def _unary(self, behavior, method: str, request_streaming: bool):
        async def call(request, context):
            request = await self._checked(request, context, method, request_streaming)
            try:
                return await behavior(request, context)
            except grpc.aio.BaseError:  # an abort, or grpc's own error: grpc answers it
                raise
            except Exception as exc:  # noqa: BLE001 - the boundary
                await self._fail(exc, context, method)
        return call

    def _stream(self, behavior, method: str, request_streaming: bool):
        async def call(request, context):
            request = await self._checked(request, context, method, request_streaming)
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write and returns None
                    await result
            except Exception as exc:  # noqa: BLE001
                await self._fail(exc, context, method)
        return call

    async def _checked(self, request, context, method: str, request_streaming: bool):
        if request_streaming:
            return _checked_stream(request, context, method)
        if isinstance(request, _Undecodable):
            await bad_request(context, method, request.message(), level=logging.WARNING)
        return request

    async def _fail(self, exc: Exception, context, method: str) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if isinstance(exc, grpc.aio.BaseError):  # a stream's write to a call already over: no status to send
            log.debug("%s: %s after the call ended: %s", method, type(exc).__name__, exc)
            return
        if isinstance(exc, StoreUnavailable):
            rate_limited(logging.WARNING, ("store", method), "%s: %s", method, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        site = (type(exc).__name__, frame.filename if frame else "", frame.lineno if frame else 0)
        tb = ""
        if site not in self._traced and len(self._traced) < 1000:  # a new site: its traceback, once
            self._traced.add(site)
            tb = "\n" + "".join(line[:1000] for line in traceback.format_exception(exc)).rstrip()
        rate_limited(logging.ERROR, ("internal", site), "unexpected %s in %s at %s:%s: %s%s",
                     type(exc).__name__, method, site[1], site[2], str(exc)[:200], tb)
        await context.abort(grpc.StatusCode.INTERNAL,
                            f"internal error in {method.rsplit('/', 1)[-1]} ({type(exc).__name__}); "
                            "the server log has the details")


async def _checked_stream(requests, context, method: str):
    async for request in requests:
        if isinstance(request, _Undecodable):
            await bad_request(context, method, request.message(), level=logging.WARNING)
        yield request
