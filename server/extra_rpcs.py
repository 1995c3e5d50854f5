"""Two Experiments RPCs added with the web console: Annotate (tags and a note) and
ListWorkers (each worker, its devices, its run and its latest usage).

A mixin of ExperimentsService (it uses the service's `db`, `store` and `dispatcher`),
kept apart so that file stays about submitting, watching and steering.
"""
from __future__ import annotations

import time

import grpc

from trainctl.server import convert
from trainctl.server.store.errors import NotFound
from trainctl.v1 import trainctl_pb2 as pb


class AnnotateAndWorkers:
    async def Annotate(self, request: pb.AnnotateRequest, context):
        note = request.note if request.HasField("note") else None
        try:
            x = await self.db(self.store.annotate, request.id, add_tags=list(request.add_tags),
                              remove_tags=list(request.remove_tags), note=note)
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except ValueError as exc:  # names the field: add_tags[0]: ..., note: ...
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.live.experiment_changed(x)  # watchers (the console's runs table) see the new tags
        return convert.experiment_to_pb(x)

    async def ListWorkers(self, request: pb.ListWorkersRequest, context):
        return pb.ListWorkersResponse(workers=await list_workers(self.db, self.store, self.dispatcher))


async def list_workers(db, store, dispatcher) -> list[pb.WorkerInfo]:
    """Stored workers (devices, last seen) joined with the live sessions (current run,
    latest heartbeat usage, which the session keeps when the worker sends it)."""
    out = []
    for w in await db(store.list_workers):
        info = pb.WorkerInfo(worker_id=w.id, hostname=w.hostname, connected=w.connected)
        ts = convert._ts(w.last_seen)
        if ts is not None:
            info.last_seen.CopyFrom(ts)
        for d in w.devices:
            info.devices.add(kind=str(d.get("kind", "")), index=int(d.get("index", 0)), name=str(d.get("name", "")),
                             memory_bytes=int(d.get("memory_bytes", 0)))
        session = dispatcher.sessions.get(w.id)
        if session is not None:
            info.connected = True
            # The session hears from it every heartbeat; the stored last_seen is only
            # written at connect and disconnect.
            info.last_seen.CopyFrom(convert._ts(time.time() - (time.monotonic() - session.last_seen)))
            if session.current:
                info.experiment_id, info.attempt = session.current
            for u in getattr(session, "usage", None) or ():
                if isinstance(u, pb.DeviceUsage):
                    info.usage.append(u)
                else:
                    info.usage.add(**u)
        out.append(info)
    return out
