"""The Experiments service: what clients call."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from trainctl.jobspec import is_job
from trainctl.server import attach, code_submit, control_rpc, convert, knobs, listing, logs_rpc, steering
from trainctl.server.dispatcher import Dispatcher
from trainctl.server.extra_rpcs import AnnotateAndWorkers
from trainctl.server.live import Live
from trainctl.server.store import entities as e
from trainctl.server.guard import bad_request
from trainctl.server.store.errors import InvalidTransition, NotFound
from trainctl.server.watch_history import SEND_TIMEOUT_S, ClientStalled, Sender, answer_stalled, history_pages
from trainctl.spec import SpecError, parse_spec
from trainctl.spec_checks import MAX_SPEC_BYTES
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.wire import dict_from_struct, largest_field

log = logging.getLogger(__name__)

MAX_NAMES = 1000  # metric names one GetMetrics may ask for (each is a bound SQL parameter)

DEFAULT_CONTROL_WAIT = control_rpc.DEFAULT_CONTROL_WAIT


class ExperimentsService(AnnotateAndWorkers, pb_grpc.ExperimentsServicer):
    watch_send_timeout = SEND_TIMEOUT_S  # seconds a Watch send may wait for a client that does not read

    def __init__(self, live: Live, dispatcher: Dispatcher):
        self.live = live
        self.store = live.store
        self.db = live.db
        self.dispatcher = dispatcher

    async def _get(self, id: int, context) -> e.Experiment:
        try:
            return await self.db(self.store.get_experiment, id)
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    # ------------------------------------------------------------------ submit / read
    async def Submit(self, request: pb.SubmitRequest, context):
        size = request.spec.ByteSize()
        if size > MAX_SPEC_BYTES:  # checked before converting: a 40 MB spec costs nothing more
            path, part = largest_field(request.spec)
            await bad_request(context, "Submit", f"invalid spec: {path}: {part:,} bytes, in a spec of {size:,} "
                                                 f"bytes serialized; the limit is {MAX_SPEC_BYTES:,} (1 MiB)")
        raw = dict_from_struct(request.spec)
        if request.code_sha256 or is_job(raw):  # the user's command on their uploaded code
            return convert.experiment_to_pb(await code_submit.submit_job(self, raw, request.code_sha256, context))
        try:
            # Validation is CPU work (pydantic, the model-name list): keep it off the loop.
            spec = await self.db(parse_spec, raw)
        except SpecError as exc:
            await bad_request(context, "Submit", f"invalid spec: {exc}")
        x = await self._create(spec.to_dict(), spec, replay_of=None)
        return convert.experiment_to_pb(x)

    async def _create(self, spec_dict: dict, spec, *, replay_of: int | None,
                      replayed: list[tuple[str, float, int, bool]] = ()) -> e.Experiment:
        """Store the experiment with its control log: the spec's scheduled commands and,
        for a replay, the original's applied live commands as (kind, value, step, hold)."""
        x = await self.db(self.store.create_experiment, spec_dict["name"], spec_dict, max_restarts=spec.max_restarts,
                          gpus=spec.resources.gpus * spec.resources.nproc if spec.resources.gpus else 0,
                          replay_of=replay_of)
        now = time.time()
        records = [_record(x.id, c.verb.upper(), c.value, e.SCHEDULED, now, at_step=c.at_step)
                   for c in spec.control]
        records += [_record(x.id, kind, value, e.REPLAYED, now, at_step=step, hold=hold)
                    for kind, value, step, hold in replayed]
        for rec in records:
            await self.db(self.store.add_control, rec)
        self.dispatcher.kick()
        self.live.experiment_changed(x)  # the console's runs table shows it at once
        log.info("experiment %d %r submitted and queued%s (%d scheduled, %d replayed commands)", x.id, x.name,
                 f", replaying experiment {replay_of}" if replay_of else "", len(spec.control), len(replayed))
        return x

    async def Get(self, request: pb.GetRequest, context):
        x = await self._get(request.id, context)
        return listing.bounded(convert.experiment_to_pb(x, await self.db(knobs.knobs_of, self.store, x)))

    async def Attach(self, request: pb.AttachRequest, context):
        return await attach.attach(self, request, context)  # server/attach.py

    async def Logs(self, request: pb.LogsRequest, context):
        await logs_rpc.logs(self, request, context)  # server/logs_rpc.py

    async def List(self, request: pb.ListRequest, context):
        """Newest first, one page: up to `limit` experiments and at most listing.PAGE_BYTES
        of them (no row, however big, can make a page exceed what gRPC sends)."""
        states = [await _enum(context, "List", f"states[{i}]", v, pb.ExperimentState)
                  for i, v in enumerate(request.states)]
        limit = request.limit or listing.DEFAULT_LIMIT
        if not 0 <= limit <= listing.MAX_LIMIT:
            await bad_request(context, "List", f"limit: must be in 0..{listing.MAX_LIMIT}, got {limit}")
        try:
            before = listing.decode_token(request.page_token)
        except ValueError as exc:
            await bad_request(context, "List", str(exc))
        out, size = pb.ListResponse(), 0
        while True:
            n = min(listing.CHUNK, limit - len(out.experiments))
            try:
                xs = await self.db(self.store.list_experiments, states or None, n + 1, before_id=before,
                                   tags=list(request.tags) or None)
            except ValueError as exc:  # a malformed tag, named by the store
                await bad_request(context, "List", str(exc))
            more = len(xs) > n
            for x in xs[:n]:
                msg = listing.bounded(convert.experiment_to_pb(x))
                if out.experiments and size + msg.ByteSize() > listing.PAGE_BYTES:
                    more = True
                    break
                out.experiments.append(msg)
                size += msg.ByteSize()
                before = x.id
            else:
                if more and len(out.experiments) < limit:
                    continue
            break
        if more:
            out.next_page_token = listing.encode_token(before)
        return out

    async def Cancel(self, request: pb.CancelRequest, context):
        await self._get(request.id, context)
        reason = request.reason or "cancelled by user"
        try:
            x = await self.db(self.store.cancel, request.id, reason)
        except InvalidTransition as exc:
            if exc.current == e.CANCELLED:  # cancelling twice is not an error: same answer
                return convert.experiment_to_pb(await self._get(request.id, context))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        session = self.dispatcher.session_for(x.id)
        if session is not None:
            # The run keeps its lease until it reports CANCELLED (or the lease expires), so
            # the rows it trained before it saw the stop are still stored, not refused.
            session.send(convert.stop_message(x.id, x.attempt, pb.STOP_CANCELLED, reason))
        else:
            self.dispatcher.release(x.id, x.attempt)
        log.info("experiment %d cancelled (attempt %d): %s", x.id, x.attempt, reason)
        await self.live.run_changed(x)
        return convert.experiment_to_pb(x)

    # ------------------------------------------------------------------ watch / metrics
    async def Watch(self, request: pb.WatchRequest, context):
        """History paged from the store, then live events, with no gap and no duplicate:
        subscribe first, then read; a batch stored meanwhile shows up in both and the
        per-scope step filter (`_after`) drops the second copy. Every send has a deadline
        (watch_history.Sender), so a client that stops reading is cut off."""
        stalled = ""
        try:
            await self._watch(request, context)
        except ClientStalled as exc:
            stalled = str(exc)
        except asyncio.CancelledError:
            # The client left or the server is stopping: nobody to answer. (Re-raised, grpc
            # logs a traceback per open stream at shutdown for handlers that use write().)
            return
        if stalled:  # answered outside the except: its traceback (and the page it holds) is gone
            await answer_stalled(context, ("stalled", request.id), stalled)

    async def _watch(self, request: pb.WatchRequest, context) -> None:
        sub = self.live.hub.subscribe(request.id)
        context.add_done_callback(lambda _: self.live.hub.unsubscribe(sub))
        send = Sender(context, request.id, self.watch_send_timeout)
        try:
            x = await self._get(request.id, context)
            await send(pb.WatchEvent(experiment=convert.experiment_to_pb(x)))
            sent = {pb.STEP: request.from_step - 1, pb.EPOCH: request.from_step - 1}
            if not request.live_only:
                first = max(request.from_step, 0)
                while True:
                    # Every row stored before the subscription is at or below x.last_step
                    # (add_metrics moves it in the same transaction); later ones come live.
                    async for rows in history_pages(self.db, self.store, request.id, first, x.last_step):
                        for batch in convert.rows_to_batches(request.id, rows):
                            sent[batch.scope] = max(sent[batch.scope], batch.rows[-1].step)
                            await send(pb.WatchEvent(metrics=batch))
                    first = max(first, x.last_step + 1)
                    x = await self._get(request.id, context)
                    # A run that ended meanwhile: its tail is read from the store too,
                    # since the live phase (which would carry it) is skipped below.
                    if not x.is_final or x.last_step < first:
                        break
                for rec in await self.db(self.store.list_controls, request.id):
                    if rec.status != e.PENDING:
                        await send(pb.WatchEvent(control=convert.control_to_pb(rec)))
            else:
                x = await self._get(request.id, context)
            if x.is_final:
                await send(pb.WatchEvent(experiment=convert.experiment_to_pb(x)))
                return
            backlog: list = []  # an event _coalesce took from the queue but could not merge
            sent_at = 0.0
            while True:
                wait = sent_at + self.live.hub.pace(request.id) - time.monotonic()
                if wait > 0 and not backlog:
                    await asyncio.sleep(wait)  # many watchers: fewer, fuller sends (see hub.py)
                event = backlog.pop() if backlog else await sub.get()
                if event is not None and event.WhichOneof("event") == "metrics":
                    event, backlog = _coalesce(event, sub)
                if event is None:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"watch of experiment {request.id} fell too far behind "
                                        f"({self.live.hub.queue_size} events queued); reconnect with from_step")
                which = event.WhichOneof("event")
                if which == "metrics":
                    event = _after(event, sent)
                    if event is None:
                        continue
                await send(event)
                sent_at = time.monotonic()
                if which == "experiment" and event.experiment.state in (pb.COMPLETED, pb.FAILED, pb.CANCELLED):
                    return
        finally:
            self.live.hub.unsubscribe(sub)

    async def GetMetrics(self, request: pb.GetMetricsRequest, context):
        if request.max_points < 0:
            await bad_request(context, "GetMetrics", f"max_points: must be >= 0, got {request.max_points}")
        scope = await _enum(context, "GetMetrics", "scope", request.scope, pb.Scope) if request.scope else None
        if len(request.names) > MAX_NAMES or any(len(n) > 128 for n in request.names):
            longest = max(map(len, request.names))
            await bad_request(context, "GetMetrics", f"names: at most {MAX_NAMES} names of at most 128 characters, "
                                                     f"got {len(request.names)} (longest {longest})")
        await self._get(request.id, context)
        # With max_points the store answers from its min/max rollup (a 1,000,000-point run
        # in tens of ms instead of reading every point); without, every point is read.
        series, total = await self.db(self.store.get_metrics_downsampled, request.id, request.max_points,
                                      scope=scope, names=list(request.names) or None,
                                      from_step=request.from_step, to_step=request.to_step or None)
        out = pb.GetMetricsResponse(total_points=total)
        for s in series:
            out.series.add(name=s.name, scope=pb.Scope.Value(s.scope), steps=s.steps, epochs=s.epochs, values=s.values)
        return out

    # ------------------------------------------------------------------ control
    async def Control(self, request: pb.ControlRequest, context):
        # Validation, refusals, dry runs and the ack wait: server/control_rpc.py.
        return await control_rpc.control(self, request, context)

    async def ListControls(self, request: pb.ListControlsRequest, context):
        await self._get(request.experiment_id, context)
        recs = await self.db(self.store.list_controls, request.experiment_id)
        return pb.ListControlsResponse(records=[convert.control_to_pb(r) for r in recs])

    async def Replay(self, request: pb.ReplayRequest, context):
        x = await self._get(request.id, context)
        if x.kind == e.CODE:
            return convert.experiment_to_pb(await code_submit.replay_job(self, x))
        try:
            spec = await self.db(parse_spec, x.spec, check_model=False)
        except SpecError as exc:  # stored before a rule it breaks existed
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"experiment {x.id} cannot be replayed: its spec is no longer valid: {exc}")
        replayed = [(r.kind, r.value, r.applied_step, r.hold)
                    for r in steering.replayed_commands(await self.db(self.store.list_controls, x.id))]
        suffix = f"-replay-of-{x.id}"  # the link is also in replay_of
        spec_dict = {**x.spec, "name": x.name[:128 - len(suffix)] + suffix}
        y = await self._create(spec_dict, spec, replay_of=x.id, replayed=replayed)
        return convert.experiment_to_pb(y)


async def _enum(context, method: str, field: str, value: int, enum) -> str:
    """The name of a wire enum value; INVALID_ARGUMENT naming the field for an unknown
    (or UNSPECIFIED) one: proto3 enums are open, so any int arrives."""
    if value == 0 or value not in enum.values():
        names = ", ".join(n for n, v in enum.items() if v)
        await bad_request(context, method, f"{field}: unknown value {value}; expected one of {names}",
                          level=logging.WARNING)
    return enum.Name(value)


def _record(experiment_id: int, kind: str, value: float, source: str, now: float, *,
            command_id: str | None = None, at_step: int | None = None, hold: bool = False) -> e.ControlRecord:
    return e.ControlRecord(command_id=command_id or uuid.uuid4().hex, experiment_id=experiment_id, kind=kind,
                           value=float(value), status=e.PENDING, source=source, requested_at=now,
                           applied_at=None, applied_step=None, old_value=None, new_value=None, message="",
                           at_step=at_step, hold=hold)


COALESCE_ROWS = 2000


def _coalesce(event: pb.WatchEvent, sub) -> tuple[pb.WatchEvent, list]:
    """Merge metric batches already queued behind `event` (same run, scope, columns) into
    one message, so a watcher that fell behind catches up in a few sends instead of
    thousands. Returns the merged event and [the first queued event that did not fit]
    (which may be the end-of-stream None), or []."""
    first = event.metrics
    merged: pb.MetricBatch | None = None
    while not sub.queue.empty():
        nxt = sub.queue.get_nowait()
        b = nxt.metrics if nxt is not None and nxt.WhichOneof("event") == "metrics" else None
        if b is None or (b.attempt, b.scope, list(b.names)) != (first.attempt, first.scope, list(first.names)) \
                or len(first.rows) + (len(merged.rows) if merged else 0) + len(b.rows) > COALESCE_ROWS:
            return (pb.WatchEvent(metrics=merged) if merged else event), [nxt]
        if merged is None:
            merged = pb.MetricBatch()
            merged.CopyFrom(first)
        merged.rows.extend(b.rows)
        merged.seq = b.seq
    return (pb.WatchEvent(metrics=merged) if merged else event), []


def _after(event: pb.WatchEvent, sent: dict[int, int]) -> pb.WatchEvent | None:
    """Drop rows a watcher already got from history (same scope, step <= last sent)."""
    batch = event.metrics
    last = sent[batch.scope]
    if not batch.rows or batch.rows[0].step > last:
        sent[batch.scope] = max(last, batch.rows[-1].step) if batch.rows else last
        return event
    keep = [r for r in batch.rows if r.step > last]
    if not keep:
        return None
    trimmed = pb.MetricBatch(experiment_id=batch.experiment_id, attempt=batch.attempt, seq=batch.seq,
                             scope=batch.scope, names=batch.names, rows=keep)
    sent[batch.scope] = keep[-1].step
    return pb.WatchEvent(metrics=trimmed)
