"""The three services of a code run's local endpoint (workers/local_endpoint.py): what
the child's SDK calls, each answering only for the endpoint's experiment and attempt,
behind one interceptor that wants the attempt's token on every call."""
from __future__ import annotations

import hmac
import queue
import threading
from typing import TYPE_CHECKING, Optional

import grpc

from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from trainctl.workers.local_endpoint import LocalEndpoint


class Abort:
    def __init__(self, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details


# ---------------------------------------------------------------------- authentication
def _bearer(metadata) -> Optional[str]:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


class TokenCheck(grpc.ServerInterceptor):
    """Every call carries this attempt's token, or is refused whatever it asked."""

    def __init__(self, token: str):
        self._token = token.encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        got = _bearer(details.invocation_metadata)
        if handler is None or (got is not None and hmac.compare_digest(got.encode(), self._token)):
            return handler
        why = "missing bearer token" if got is None else "invalid token for this run's endpoint"

        def unary(request, context):
            context.abort(_UNAUTH, why)

        def streaming(request, context):
            context.abort(_UNAUTH, why)
            yield  # (a generator: the handler shape of a streaming response)

        shape = (handler.request_streaming, handler.response_streaming)
        return _HANDLERS[shape](streaming if shape[1] else unary, handler.request_deserializer,
                                handler.response_serializer)


_DENIED, _UNAUTH = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


# ---------------------------------------------------------------------- services
class Experiments(pb_grpc.ExperimentsServicer):
    def __init__(self, ep: LocalEndpoint):
        self.ep = ep

    def Attach(self, request, context):
        return self.ep.attach_response()  # name, config, replay_of: the job spec decided them

    def Get(self, request, context):
        if request.id != self.ep.experiment_id:
            context.abort(_DENIED, f"id: {request.id}: this endpoint answers only for experiment {self.ep.experiment_id}")
        return self.ep.experiment()


class Workers(pb_grpc.WorkersServicer):
    def __init__(self, ep: LocalEndpoint):
        self.ep = ep

    def Connect(self, request_iterator, context):
        ep = self.ep
        first = next(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("msg") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a hello")
        cur = first.hello.current
        if not ep._mine(cur.experiment_id, cur.attempt):
            context.abort(_DENIED, ep._not_mine("hello.current", cur.experiment_id, cur.attempt))
        out: queue.Queue = queue.Queue()
        context.add_callback(lambda: out.put(None))  # the call ended (the child went away)
        ep._open(out)
        threading.Thread(target=ep._read, args=(request_iterator, out, first.hello.worker_id[:100]),
                         name="local-endpoint-read",
                         daemon=True).start()
        try:
            while True:
                msg = out.get()
                if msg is None:
                    return
                if isinstance(msg, Abort):
                    context.abort(msg.code, msg.details)
                yield msg
        finally:
            ep._close(out)


class Artifacts(pb_grpc.ArtifactsServicer):
    """This run's checkpoints and files, proxied to the server with the worker's token."""

    def __init__(self, ep: LocalEndpoint):
        self.ep = ep

    def _own(self, context, experiment_id: int, what: str) -> None:
        if experiment_id != self.ep.experiment_id:
            context.abort(_DENIED, f"{what}: {experiment_id}: this run may only reach experiment "
                                   f"{self.ep.experiment_id}'s artifacts")

    def Upload(self, request_iterator, context):
        ep = self.ep
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first chunk must carry the header")
        art = pb.Artifact()
        art.CopyFrom(first.header.artifact)
        self._own(context, art.experiment_id, "artifact.experiment_id")
        if art.attempt not in (0, ep.attempt):
            context.abort(_DENIED, f"artifact.attempt: {art.attempt}: this run is attempt {ep.attempt}")
        if art.kind not in (pb.ARTIFACT_CHECKPOINT, pb.ARTIFACT_FILE):
            context.abort(_DENIED, f"artifact.kind: {pb.ArtifactKind.Name(art.kind)}: a run uploads "
                                   "checkpoints and files only")
        art.attempt = ep.attempt
        if ep.fenced:
            context.abort(_DENIED, f"experiment {ep.experiment_id} attempt {ep.attempt} was fenced")
        if art.kind == pb.ARTIFACT_CHECKPOINT:
            ep.rows_first()

        def chunks():
            yield pb.UploadChunk(header=pb.UploadHeader(artifact=art))  # the worker's lease vouches for it
            yield from request_iterator

        stub, md = ep.upstream()
        try:
            return stub.Upload(chunks(), metadata=md)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())

    def _ref(self, context, ref: pb.ArtifactRef) -> None:
        self._own(context, ref.experiment_id, "ref.experiment_id")
        if not ref.name:
            context.abort(_DENIED, "ref.name: name one of this run's artifacts (a bare sha256 is not enough)")

    def Download(self, request, context):
        self._ref(context, request)
        stub, md = self.ep.upstream()
        try:
            yield from stub.Download(request, metadata=md)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())

    def Stat(self, request, context):
        self._ref(context, request)
        return self._unary(context, "Stat", request)

    def ListArtifacts(self, request, context):
        self._own(context, request.experiment_id, "experiment_id")
        return self._unary(context, "ListArtifacts", request)

    def _unary(self, context, method: str, request):
        stub, md = self.ep.upstream()
        try:
            return getattr(stub, method)(request, metadata=md, timeout=30)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())

    def CollectGarbage(self, request, context):
        context.abort(_DENIED, "CollectGarbage: not from a run")
