"""The Experiments service: what clients call."""
from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

import grpc

from trainctl.server import convert
from trainctl.server.dispatcher import Dispatcher
from trainctl.server.live import Live
from trainctl.server.store import entities as e
from trainctl.server.store.errors import InvalidTransition, NotFound
from trainctl.spec import SpecError, check_control_value, parse_spec
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc
from trainctl.wire import dict_from_struct, verb_of
from trainctl.workers.engine.schedulers import NoDecayFactor, build_schedule

log = logging.getLogger(__name__)

DEFAULT_CONTROL_WAIT = 10.0


class ExperimentsService(pb_grpc.ExperimentsServicer):
    def __init__(self, live: Live, dispatcher: Dispatcher):
        self.live = live
        self.store = live.store
        self.db = live.db
        self.dispatcher = dispatcher
        self._refusals: dict[tuple[int, str], str] = {}

    async def _get(self, id: int, context) -> e.Experiment:
        try:
            return await self.db(self.store.get_experiment, id)
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    # ------------------------------------------------------------------ submit / read
    async def Submit(self, request: pb.SubmitRequest, context):
        raw = dict_from_struct(request.spec)
        try:
            # Validation is CPU work (pydantic, the model-name list): keep it off the loop.
            spec = await self.db(parse_spec, raw)
        except SpecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid spec: {exc}")
        x = await self._create(spec.to_dict(), spec, replay_of=None)
        return convert.experiment_to_pb(x)

    async def _create(self, spec_dict: dict, spec, *, replay_of: int | None,
                      replayed: list[tuple[str, float, int]] = ()) -> e.Experiment:
        """Store the experiment with its control log: the spec's scheduled commands and,
        for a replay, the original's applied live commands as (kind, value, step)."""
        x = await self.db(self.store.create_experiment, spec.name, spec_dict, max_restarts=spec.max_restarts,
                          gpus=spec.resources.gpus * spec.resources.nproc if spec.resources.gpus else 0,
                          replay_of=replay_of)
        now = time.time()
        records = [_record(x.id, c.verb.upper(), c.value, e.SCHEDULED, now, at_step=c.at_step)
                   for c in spec.control]
        records += [_record(x.id, kind, value, e.REPLAYED, now, at_step=step) for kind, value, step in replayed]
        for rec in records:
            await self.db(self.store.add_control, rec)
        self.dispatcher.kick()
        log.info("experiment %d %r queued", x.id, x.name)
        return x

    async def Get(self, request: pb.GetRequest, context):
        return convert.experiment_to_pb(await self._get(request.id, context))

    async def List(self, request: pb.ListRequest, context):
        states = [pb.ExperimentState.Name(s) for s in request.states] or None
        limit = request.limit or 100
        if limit < 0 or limit > 10_000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit: must be in 0..10000, got {limit}")
        xs = await self.db(self.store.list_experiments, states, limit)
        return pb.ListResponse(experiments=[convert.experiment_to_pb(x) for x in xs])

    async def Cancel(self, request: pb.CancelRequest, context):
        await self._get(request.id, context)
        reason = request.reason or "cancelled by user"
        try:
            x = await self.db(self.store.cancel, request.id, reason)
        except InvalidTransition as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        session = self.dispatcher.session_for(x.id)
        if session is not None:
            session.send(pb.ServerMessage(cancel=pb.CancelRun(experiment_id=x.id, attempt=x.attempt, reason=reason)))
        self.dispatcher.release(x.id, x.attempt)
        self.live.experiment_changed(x)
        return convert.experiment_to_pb(x)

    # ------------------------------------------------------------------ watch / metrics
    async def Watch(self, request: pb.WatchRequest, context):
        x = await self._get(request.id, context)
        # Subscribe before reading history: a batch stored meanwhile shows up in both,
        # and the per-scope step filter below drops the second copy (no gap, no dup).
        sub = self.live.hub.subscribe(request.id)
        context.add_done_callback(lambda _: self.live.hub.unsubscribe(sub))
        try:
            yield pb.WatchEvent(experiment=convert.experiment_to_pb(x))
            sent = {pb.STEP: request.from_step - 1, pb.EPOCH: request.from_step - 1}
            if not request.live_only:
                rows = await self.db(self.store.metric_rows, request.id, from_step=max(request.from_step, 0))
                for batch in convert.rows_to_batches(request.id, rows):
                    sent[batch.scope] = max(sent[batch.scope], batch.rows[-1].step)
                    yield pb.WatchEvent(metrics=batch)
                for rec in await self.db(self.store.list_controls, request.id):
                    if rec.status != e.PENDING:
                        yield pb.WatchEvent(control=convert.control_to_pb(rec))
            x = await self._get(request.id, context)
            if x.is_final:
                yield pb.WatchEvent(experiment=convert.experiment_to_pb(x))
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
                yield event
                sent_at = time.monotonic()
                if which == "experiment" and event.experiment.state in (pb.COMPLETED, pb.FAILED, pb.CANCELLED):
                    return
        finally:
            self.live.hub.unsubscribe(sub)

    async def GetMetrics(self, request: pb.GetMetricsRequest, context):
        await self._get(request.id, context)
        if request.max_points < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_points: must be >= 0, got {request.max_points}")
        scope = pb.Scope.Name(request.scope) if request.scope else None
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
        verb = verb_of(request.kind)
        if verb is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kind: unknown control kind {request.kind}")
        try:
            check_control_value(verb, request.value)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"value: {exc}")
        if request.wait_seconds < 0 or not math.isfinite(request.wait_seconds) or request.wait_seconds > 600:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"wait_seconds: must be in [0, 600], got {request.wait_seconds}")
        x = await self._get(request.experiment_id, context)
        if x.is_final:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"experiment {x.id} is {x.state}; it can no longer be steered")
        key = (x.id, verb)
        if key not in self._refusals:  # the spec never changes: check each verb once
            self._refusals[key] = await self.db(_unsupported, x.spec, verb, request.value)
        problem = self._refusals[key]
        if problem:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        command_id = request.command_id or uuid.uuid4().hex
        rec = await self.db(self.store.add_control,
                            _record(x.id, pb.ControlKind.Name(request.kind), request.value, e.LIVE, time.time(),
                                    command_id=command_id))
        if rec.status != e.PENDING:  # an idempotent retry of a command already resolved
            return convert.control_to_pb(rec)
        session = self.dispatcher.session_for(x.id)
        if session is None:  # QUEUED (or between workers): delivered with the assignment
            return convert.control_to_pb(rec)
        ack = self.live.expect_control(command_id)
        session.send(pb.ServerMessage(control=pb.ControlCommand(
            experiment_id=x.id, attempt=x.attempt, command_id=command_id, kind=request.kind, value=request.value)))
        done = await self.live.wait_control(command_id, ack, request.wait_seconds or DEFAULT_CONTROL_WAIT)
        return convert.control_to_pb(done or rec)

    async def ListControls(self, request: pb.ListControlsRequest, context):
        await self._get(request.experiment_id, context)
        recs = await self.db(self.store.list_controls, request.experiment_id)
        return pb.ListControlsResponse(records=[convert.control_to_pb(r) for r in recs])

    async def Replay(self, request: pb.ReplayRequest, context):
        x = await self._get(request.id, context)
        spec = await self.db(parse_spec, x.spec, check_model=False)
        replayed = [(r.kind, r.value, r.applied_step) for r in await self.db(self.store.list_controls, x.id)
                    if r.source != e.SCHEDULED and r.status == e.APPLIED]
        spec_dict = {**x.spec, "name": f"{x.name}-replay"[:128]}
        y = await self._create(spec_dict, spec, replay_of=x.id, replayed=replayed)
        return convert.experiment_to_pb(y)


def _record(experiment_id: int, kind: str, value: float, source: str, now: float, *,
            command_id: str | None = None, at_step: int | None = None) -> e.ControlRecord:
    return e.ControlRecord(command_id=command_id or uuid.uuid4().hex, experiment_id=experiment_id, kind=kind,
                           value=float(value), status=e.PENDING, source=source, requested_at=now,
                           applied_at=None, applied_step=None, old_value=None, new_value=None, message="",
                           at_step=at_step)


def _unsupported(spec_dict: dict, verb: str, value: float) -> str:
    """Why `verb` cannot apply to this experiment's spec, or '' if it can."""
    spec = parse_spec(spec_dict, check_model=False)
    if verb == "set_lr_decay":
        sched = build_schedule(spec.schedule, base_lr=spec.optimizer.lr, steps_per_epoch=1, epochs=spec.train.epochs)
        try:
            sched.set_decay(0, value)
        except NoDecayFactor as exc:
            return str(exc)
        except ValueError:
            return ""  # range problems were reported as INVALID_ARGUMENT already
    if verb == "set_ema_decay" and spec.train.ema is None:
        return "set_ema_decay needs model EMA; this experiment's spec has no train.ema"
    return ""


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
