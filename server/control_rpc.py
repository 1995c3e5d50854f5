"""The Control RPC: validate, decide (server/steering.py), store, send, wait for the ack.

Statuses a client can get, each with a message naming the field or the reason:
  INVALID_ARGUMENT     unknown kind/source, a value out of range, hold on a verb that has
                       none, a bad wait_seconds; SET_KNOB naming no declared knob (the
                       message lists them) or a value outside the knob's bounds
  NOT_FOUND            no such experiment
  FAILED_PRECONDITION  the run is final; the spec cannot take the verb (no decay factor,
                       no EMA); set_lr_decay where no decay follows the step it would apply at
  ALREADY_EXISTS       the command id is taken in this experiment by another command
  OK                   the stored record: APPLIED/REJECTED/EXPIRED once the worker
                       answered (or the run ended), PENDING when wait_seconds passed first
                       or no worker holds the run yet; for dry_run an unstored record
                       (status unset) with the old/new values and the consequence.
"""
from __future__ import annotations

import logging
import math
import time
import uuid

import grpc

from trainctl.server import convert, knobs, steering
from trainctl.server.store import entities as e
from trainctl.server.store.errors import AlreadyExists, NotFound, StoreError
from trainctl.spec import check_control_value, parse_spec
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.controls import KNOB_VERB, verb_of

log = logging.getLogger(__name__)

DEFAULT_CONTROL_WAIT = 10.0
_SOURCES = {pb.CONTROL_SOURCE_UNSPECIFIED: e.LIVE, pb.LIVE: e.LIVE, pb.CONSOLE: e.CONSOLE}


async def control(service, request: pb.ControlRequest, context) -> pb.ControlRecord:
    # The client waits on this call until the run's ack is stored: metric writes step
    # aside meanwhile (bounded: store/writelock.Urgency), so their ~20 ms of work a second
    # does not sit between the command's hops (bench/RESULTS.md, set-lr).
    with service.store.urgent():
        return await _control(service, request, context)


async def _control(service, request: pb.ControlRequest, context) -> pb.ControlRecord:
    verb = await _checked_verb(request, context)
    source = _SOURCES[request.source]
    # A live attached run whose SDK is connected is RUNNING and its SDK decides (its ack
    # says why): nothing to read first, so the command is stored and sent at once.
    attempt = None if verb == KNOB_VERB or request.dry_run else \
        service.dispatcher.attached_attempt(request.experiment_id)
    if attempt is None:
        x = await service._get(request.experiment_id, context)
        decision = await _decision(service, x, verb, request, context)
        if request.dry_run:
            return _dry_run_record(x.id, pb.ControlKind.Name(request.kind), request, source, decision)
        attempt = x.attempt
    experiment_id = request.experiment_id
    command_id = request.command_id or uuid.uuid4().hex
    now = time.time()
    try:
        rec = await service.db(service.store.add_control, e.ControlRecord(
            command_id=command_id, experiment_id=experiment_id, kind=pb.ControlKind.Name(request.kind),
            value=float(request.value), status=e.PENDING, source=source, requested_at=now, hold=bool(request.hold),
            knob=request.knob))
    except AlreadyExists as exc:
        await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                            f"command_id: {exc}; a retry must repeat the same kind, value and hold")
    except NotFound as exc:
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    if rec.status != e.PENDING:  # an idempotent retry of a command already resolved (or the run just ended)
        return convert.control_to_pb(rec)
    retry = rec.requested_at != now  # the stored record is an earlier call's: it was sent then
    session = service.dispatcher.session_for(experiment_id)
    if session is None:  # QUEUED (or between workers): delivered with the assignment
        return convert.control_to_pb(rec)
    ack = service.live.expect_control(experiment_id, command_id)
    if not retry:  # sending a retry again would apply the command twice
        session.send(pb.ServerMessage(control=pb.ControlCommand(
            experiment_id=experiment_id, attempt=attempt, command_id=command_id, kind=request.kind,
            value=request.value, hold=request.hold, knob=request.knob)))
    done = await service.live.wait_control(experiment_id, command_id, ack, request.wait_seconds or DEFAULT_CONTROL_WAIT)
    if done is None and retry:  # its ack may have come before this call started waiting
        done = next((r for r in await service.db(service.store.list_controls, experiment_id)
                     if r.command_id == command_id), None)
    return convert.control_to_pb(done or rec)  # PENDING when wait_seconds passed first


async def _checked_verb(request: pb.ControlRequest, context) -> str:
    """The request's verb, once every field that needs no store read is checked."""
    verb = verb_of(request.kind)
    if verb is None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kind: unknown control kind {request.kind}")
    try:
        check_control_value(verb, request.value)
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"value: {exc}")
    if request.hold and verb not in steering.HOLD_VERBS:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"hold: applies to SET_LR and SCALE_LR only, not {pb.ControlKind.Name(request.kind)}")
    if request.knob and verb != KNOB_VERB:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"knob: only SET_KNOB names a knob, not {pb.ControlKind.Name(request.kind)}")
    if request.source not in _SOURCES:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"source: a client sends LIVE or CONSOLE, got {request.source}")
    if request.wait_seconds < 0 or not math.isfinite(request.wait_seconds) or request.wait_seconds > 600:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"wait_seconds: must be in [0, 600], got {request.wait_seconds}")
    return verb


async def _decision(service, x: e.Experiment, verb: str, request: pb.ControlRequest, context) -> "_Decision":
    """Whether the run can take the command now and, for a dry run, what it would do."""
    if x.is_final:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"experiment {x.id} is {x.state}; it can no longer be steered")
    if verb == KNOB_VERB:
        declared = await service.db(service.store.list_knobs, x.id)
        why = knobs.knob_refusal(x, declared, request.knob, request.value)
        if why:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
        now_value = next(k.value for k in declared if k.name == request.knob)
        return _Decision(old=now_value, new=request.value,
                         consequence=f"knob {request.knob} {request.value:g} from the run's next step")
    if x.kind != e.SPEC:  # the user's loop (its config is no spec): the SDK decides, its ack says why
        return _Decision()
    decision = await service.db(_decide, service.store, x, verb, request.value, request.hold, request.dry_run)
    if decision.refusal:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, decision.refusal)
    return decision


class _Decision:
    def __init__(self, refusal: str = "", step: int | None = None, old: float = math.nan, new: float = math.nan,
                 consequence: str = ""):
        self.refusal, self.step, self.old, self.new, self.consequence = refusal, step, old, new, consequence


def _decide(store, x: e.Experiment, verb: str, value: float, hold: bool, dry_run: bool) -> _Decision:
    """In a store thread: static refusals, then (for set_lr_decay or a dry run) the
    forecast at the step the command would apply at. A spec whose schedule cannot even
    be built (the run fails with that error) gets no forecast: the worker decides."""
    try:
        return _forecast_decision(store, x, verb, value, hold, dry_run)
    except StoreError:
        raise  # UNAVAILABLE and friends: the guard maps them
    except ValueError as exc:
        log.info("control of experiment %d: no forecast: %s", x.id, exc)
        return _Decision(consequence=f"no forecast: {exc}" if dry_run else "")


def _forecast_decision(store, x: e.Experiment, verb: str, value: float, hold: bool, dry_run: bool) -> _Decision:
    spec = parse_spec(x.spec, check_model=False)
    why = steering.static_refusal(spec, verb)
    if why:
        return _Decision(refusal=why)
    if verb != "set_lr_decay" and not dry_run:
        return _Decision()
    epochs = store.get_metrics(x.id, scope="EPOCH")
    epoch_steps = sorted({(st, ep) for s in epochs for st, ep in zip(s.steps, s.epochs)}, key=lambda p: p[1])
    spe = steering.forecast_steps_per_epoch(spec, epoch_steps)
    if spe is None:  # imagefolder before its first epoch: the worker alone decides
        return _Decision(consequence=steering.no_forecast_reason(spec))
    step = _next_step(store, x)
    metrics: dict[int, dict[str, float]] = {}
    for s in epochs:
        for ep, v in zip(s.epochs, s.values):
            metrics.setdefault(ep, {})[s.name] = v
    log_ = [steering.LoggedCommand(_step_of(r), _verb(r.kind), r.value, bool(getattr(r, "hold", False)))
            for r in store.list_controls(x.id) if _step_of(r) is not None]
    f = steering.Forecast(spec, spe, step, log_, metrics)
    if verb == "set_lr_decay":
        why = f.decay_refusal()
        if why:
            return _Decision(refusal=f"set_lr_decay at step {step} (the run's next step) would change nothing: {why}")
    if not dry_run:
        return _Decision(step=step)
    try:
        old, new, words = f.try_command(verb, value, hold)
    except ValueError as exc:
        return _Decision(refusal=str(exc))
    return _Decision(step=step, old=old, new=new, consequence=words)


def _next_step(store, x: e.Experiment) -> int:
    """The step a command sent now applies at, as near as the server knows: the first
    step not yet stored (a live run is usually a few steps ahead of its stored rows)."""
    try:  # a requeued run resumes near there too; a fresh one has none: 0
        return int(store.delivered(x.id)[0])
    except (AttributeError, NotImplementedError):
        return x.last_step + 1 if x.last_step else 0


def _step_of(r: e.ControlRecord) -> int | None:
    """The step a stored command took effect (or will) before a new one: applied ones
    at their step, scheduled/replayed pending ones at theirs; others changed nothing."""
    if r.status == e.APPLIED:
        return r.applied_step
    if r.status == e.PENDING and r.at_step is not None:
        return r.at_step
    return None


def _verb(kind: str) -> str:
    return kind.lower()


def _dry_run_record(experiment_id: int, kind: str, request: pb.ControlRequest, source: str,
                    d: _Decision) -> pb.ControlRecord:
    where = f"at step {d.step} (the run's next step; a live command lands a few steps later)" \
        if d.step is not None else "when the run picks it up"
    msg = pb.ControlRecord(
        command_id=request.command_id, experiment_id=experiment_id, kind=request.kind, value=request.value,
        source=pb.ControlSource.Value(source), old_value=d.old, new_value=d.new, hold=request.hold, knob=request.knob,
        message=f"dry run: nothing stored or sent; {kind} {request.value:g} would apply {where}",
        consequence=d.consequence)
    msg.requested_at.FromSeconds(int(time.time()))
    msg.applied_step = d.step if d.step is not None else -1
    return msg
