"""What the console's HTTP API does, with no HTTP in it (tested in-process).

Steering and annotating call the gRPC service's own methods (ExperimentsService.Control,
.Cancel, .Annotate) in-process with a small context object: the same validation, the
same record in the store, the same path to the worker and the same wait for the ack as
`trainctl set-lr`, with source CONSOLE. Reads use the same store and convert.py, and
live data comes from the hub (see stream.py), never from polling the database.
"""
from __future__ import annotations

import grpc

from trainctl.server import convert
from trainctl.server.console import jsonify
from trainctl.server.console.board import Board
from trainctl.server.extra_rpcs import list_workers
from trainctl.server.store import entities as e
from trainctl.server.store.errors import NotFound, StoreError, StoreUnavailable
from trainctl.v1 import trainctl_pb2 as pb

MAX_HISTORY_POINTS = 20_000   # per series, what a browser draws without strain
MAX_LIST = 1_000
MAX_COMPARE = 12

_HTTP = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
         "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "FAILED_PRECONDITION": 409, "RESOURCE_EXHAUSTED": 429,
         "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


class ConsoleError(Exception):
    """An answer other than OK: the gRPC status name, its message, the HTTP status."""

    def __init__(self, code: str, message: str):
        self.code, self.message = code, message
        self.http = _HTTP.get(code, 500)
        super().__init__(f"{code}: {message}")


class _Context:
    """Just enough of grpc.aio.ServicerContext for the unary handlers."""

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        raise ConsoleError(code.name, details)

    def invocation_metadata(self):
        return ()

    def peer(self) -> str:
        return "console"

    def set_code(self, code) -> None:
        pass

    def set_details(self, details) -> None:
        pass

    def add_done_callback(self, fn) -> None:
        pass


class Backend:
    def __init__(self, service, live, dispatcher):
        self.service = service          # the ExperimentsService instance gRPC serves
        self.live = live
        self.store = live.store
        self.db = live.db
        self.dispatcher = dispatcher
        self.board = Board()
        live.hub.listeners.append(self.board.on_event)

    def close(self) -> None:
        try:
            self.live.hub.listeners.remove(self.board.on_event)
        except ValueError:
            pass

    async def _rpc(self, method: str, request):
        try:
            return await getattr(self.service, method)(request, _Context())
        except ConsoleError:
            raise
        except NotFound as exc:
            raise ConsoleError("NOT_FOUND", str(exc)) from None
        except StoreUnavailable as exc:
            raise ConsoleError("UNAVAILABLE", str(exc)) from None
        except StoreError as exc:
            raise ConsoleError("FAILED_PRECONDITION", str(exc)) from None

    async def _store(self, fn, *args, **kw):
        try:
            return await self.db(fn, *args, **kw)
        except NotFound as exc:
            raise ConsoleError("NOT_FOUND", str(exc)) from None
        except StoreUnavailable as exc:
            raise ConsoleError("UNAVAILABLE", str(exc)) from None
        except ValueError as exc:
            raise ConsoleError("INVALID_ARGUMENT", str(exc)) from None

    # ------------------------------------------------------------------ reads
    async def runs(self, *, states: list[str] = (), tags: list[str] = (), limit: int = 500) -> dict:
        for s in states:
            if s not in e.STATES:
                raise ConsoleError("INVALID_ARGUMENT", f"state: must be one of {', '.join(e.STATES)}, got {s[:40]!r}")
        if not 0 < limit <= MAX_LIST:
            raise ConsoleError("INVALID_ARGUMENT", f"limit: must be in 1..{MAX_LIST}, got {limit}")
        xs = await self._store(self.store.list_experiments, list(states) or None, limit, tags=list(tags) or None)
        rows = [{"id": x.id, "x": jsonify.experiment(convert.experiment_to_pb(x)), "m": self.board.metrics_of(x.id)}
                for x in xs]
        return {"version": self.board.version, "runs": rows}

    async def experiment(self, id: int) -> dict:
        x = await self._store(self.store.get_experiment, id)
        recs = await self._store(self.store.list_controls, id)
        return {"experiment": jsonify.experiment(convert.experiment_to_pb(x), spec=True),
                "controls": [jsonify.control(convert.control_to_pb(r)) for r in recs],
                "live": self.board.metrics_of(id)}

    async def history(self, id: int, max_points: int) -> dict:
        """Every series downsampled from the store's min/max rollup (a 1,000,000-point run
        answers in tens of ms), plus wall-time anchors for the wall-clock axis."""
        if not 0 < max_points <= MAX_HISTORY_POINTS:
            raise ConsoleError("INVALID_ARGUMENT", f"points: must be in 1..{MAX_HISTORY_POINTS}, got {max_points}")
        series, total = await self._store(self.store.get_metrics_downsampled, id, max_points)
        out: dict[str, dict] = {"STEP": {}, "EPOCH": {}}
        last = {"STEP": -1, "EPOCH": -1}
        anchor_steps: set[int] = set()
        for s in series:
            out[s.scope][s.name] = {"steps": s.steps, "epochs": s.epochs,
                                    "values": [v if v == v and abs(v) != float("inf") else None for v in s.values]}
            if s.steps:
                last[s.scope] = max(last[s.scope], s.steps[-1])
                if s.scope == e.STEP and len(anchor_steps) < 1000:
                    stride = max(1, len(s.steps) // 500)
                    anchor_steps.update(s.steps[::stride])
                    anchor_steps.add(s.steps[-1])
        walls = await self._store(self.store.wall_times, id, sorted(anchor_steps))
        return {"series": out, "total_points": total, "last": last,
                "wall": sorted([k, v] for k, v in walls.items())}

    async def workers(self) -> dict:
        infos = await list_workers(self.db, self.store, self.dispatcher)
        return {"workers": [jsonify.worker(w) for w in infos], "usage_reported": any(w.usage for w in infos)}

    # ------------------------------------------------------------------ writes (the gRPC path)
    async def control(self, id: int, body: dict) -> dict:
        kind = body.get("kind")
        if not isinstance(kind, str) or kind not in pb.ControlKind.keys() or kind == "CONTROL_KIND_UNSPECIFIED":
            raise ConsoleError("INVALID_ARGUMENT", f"kind: must be one of {', '.join(e.CONTROL_KINDS)}, "
                                                   f"got {str(kind)[:40]!r}")
        value = _number(body, "value")
        wait = _number(body, "wait_seconds", 10.0)
        req = pb.ControlRequest(experiment_id=id, kind=pb.ControlKind.Value(kind), value=value,
                                dry_run=bool(body.get("dry_run")), hold=bool(body.get("hold")),
                                wait_seconds=wait, source=pb.CONSOLE)
        if isinstance(body.get("command_id"), str):
            req.command_id = body["command_id"][:64]
        return jsonify.control(await self._rpc("Control", req))

    async def cancel(self, id: int, reason: str) -> dict:
        x = await self._rpc("Cancel", pb.CancelRequest(id=id, reason=reason[:500] or "cancelled from the console"))
        return jsonify.experiment(x)

    async def annotate(self, id: int, body: dict) -> dict:
        req = pb.AnnotateRequest(id=id)
        for field in ("add_tags", "remove_tags"):
            tags = body.get(field, [])
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags) or len(tags) > 100:
                raise ConsoleError("INVALID_ARGUMENT", f"{field}: must be a list of at most 100 strings")
            getattr(req, field).extend(tags)
        if "note" in body:
            if not isinstance(body["note"], str):
                raise ConsoleError("INVALID_ARGUMENT", "note: must be a string")
            req.note = body["note"]
        return jsonify.experiment(await self._rpc("Annotate", req))


def _number(body: dict, field: str, default: float | None = None) -> float:
    v = body.get(field, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConsoleError("INVALID_ARGUMENT", f"{field}: must be a number, got {str(v)[:40]!r}")
    return float(v)
