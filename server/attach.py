"""Attached runs, server side: the Attach RPC and the session check on Connect.

`trainctl.init` in the user's script calls Attach: the server stores an ATTACHED
experiment directly ASSIGNED (attempt 1) to a session it names ("attached-<id>-<rand>"),
holds a lease for it in the dispatcher (never dispatched: claim_next skips it), and
answers with a random run token. The SDK then opens Workers.Connect with that worker id,
`current` = the run and the token; from there it is a worker that brings its own run:
metrics, acks, heartbeats and state updates are the usual messages, fenced by lease,
experiment and attempt.

Only the sha256 of the token is stored (experiments.run_token_hash), so it survives a
server restart (the SDK re-adopts within the recovery grace) without the database
holding a usable secret. With auth on, a client token may open Connect only with a
run token (auth.py), and `verify_session` ties such a session to its one run.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time

from trainctl.server import convert, steering
from trainctl.server.guard import bad_request
from trainctl.server.store import entities as e
from trainctl.server.store.errors import NotFound
from trainctl.spec_checks import MAX_SPEC_BYTES
from trainctl.v1 import trainctl_pb2 as pb
from trainctl.wire import dict_from_struct, largest_field

log = logging.getLogger(__name__)

SESSION_PREFIX = "attached-"  # worker ids of this form are only ever attached sessions
MAX_NAME = 128
# Client-chosen attach key (gRPC metadata: the proto has no field for it). It becomes the
# run token, so a retried Attach whose first reply was lost finds its run by the token's
# hash (also after a server restart) instead of creating a second experiment. Being a
# bearer secret, it must be long and random: 32..128 URL-safe characters.
ATTACH_KEY = "trainctl-attach-key"
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def attach_key(context) -> str:
    """The request's attach key, '' when none; `None` when malformed."""
    for k, v in context.invocation_metadata() or ():
        if k == ATTACH_KEY:
            v = v if isinstance(v, str) else v.decode("ascii", "replace")
            return v if 32 <= len(v) <= 128 and set(v) <= _KEY_CHARS else None
    return ""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _non_finite(v, path: str) -> str:
    """The dotted path of the first NaN/inf in a config, or ''."""
    if isinstance(v, float) and not math.isfinite(v):
        return path
    if isinstance(v, dict):
        return next((p for k, x in v.items() if (p := _non_finite(x, f"{path}.{k}"))), "")
    if isinstance(v, list):
        return next((p for i, x in enumerate(v) if (p := _non_finite(x, f"{path}[{i}]"))), "")
    return ""


async def attach(service, request: pb.AttachRequest, context) -> pb.AttachResponse:
    name = request.name.strip()
    if not name or len(name) > MAX_NAME or not name.isprintable():
        await bad_request(context, "Attach", f"name: 1..{MAX_NAME} printable characters, got {request.name[:140]!r}")
    size = request.config.ByteSize()
    if size > MAX_SPEC_BYTES:
        path, part = largest_field(request.config)
        await bad_request(context, "Attach", f"config: {path}: {part:,} bytes, in a config of {size:,} bytes "
                                             f"serialized; the limit is {MAX_SPEC_BYTES:,} (1 MiB)")
    config = dict_from_struct(request.config)
    bad = _non_finite(config, "config")
    if bad:
        await bad_request(context, "Attach", f"{bad}: must be finite (JSON has no NaN or infinity)")
    replay_of = request.replay_of or None
    replayed: list[e.ControlRecord] = []
    if replay_of is not None:
        original = await service._get(replay_of, context)  # NOT_FOUND names the id
        replayed = steering.replayed_commands(await service.db(service.store.list_controls, original.id))
    key = attach_key(context)
    if key is None:
        await bad_request(context, "Attach", f"metadata {ATTACH_KEY}: 32..128 URL-safe characters "
                                             "(A-Z a-z 0-9 - _), e.g. secrets.token_urlsafe(32)")
    token = key or secrets.token_urlsafe(32)
    suffix = secrets.token_hex(4)
    try:
        x = await service.db(service.store.create_attached, name, config, session_suffix=suffix,
                             run_token_hash=token_hash(token), tags=list(request.tags), replay_of=replay_of)
    except ValueError as exc:  # a malformed tag, named by the store
        await bad_request(context, "Attach", str(exc))
    now = time.time()
    records = []
    if not x.worker_id.endswith(f"-{suffix}"):  # this key's run exists: the same answer again
        if x.name != name or (x.replay_of or None) != replay_of:
            await bad_request(context, "Attach", f"metadata {ATTACH_KEY}: already attached experiment {x.id} "
                                                 f"({x.name!r}); a retry must send the same name and replay_of")
        records = [r for r in await service.db(service.store.list_controls, x.id)
                   if r.source == e.REPLAYED and r.status == e.PENDING]
        replayed = []
        log.info("experiment %d %r: Attach retried with its key; same run", x.id, x.name)
    for r in replayed:
        records.append(await service.db(service.store.add_control, steering.replay_record(r, x.id, now)))
    if x.state in (e.ASSIGNED, e.RUNNING):  # (a retried key whose run already ended gets it as is)
        service.dispatcher.hold_attached(x)
    service.live.experiment_changed(x)
    log.info("experiment %d %r attached (session %s)%s", x.id, x.name, x.worker_id,
             f", replaying {len(records)} commands of experiment {replay_of}" if replay_of else "")
    return pb.AttachResponse(experiment=convert.experiment_to_pb(x), attempt=x.attempt, worker_id=x.worker_id,
                             run_token=token, heartbeat_interval_s=service.dispatcher.heartbeat_interval,
                             lease_timeout_s=service.dispatcher.lease_timeout,
                             controls=[convert.control_to_pb(r) for r in records])


async def verify_session(store_db, store, hello: pb.Hello) -> str:
    """'' when `hello` proves it is the attached session of hello.current's run (right
    worker id, right run token); else why not, for PERMISSION_DENIED. A worker id of the
    attached form without a run token is refused too: it could otherwise hold that
    run's lease by name."""
    if not hello.run_token:
        if hello.worker_id.startswith(SESSION_PREFIX):
            return f"hello.worker_id: {hello.worker_id[:80]!r} is an attached session; it needs its run_token"
        return ""
    exp_id = hello.current.experiment_id
    if not exp_id:
        return "hello.current: a run_token speaks for one run; name it in hello.current.experiment_id"
    try:
        x = await store_db(store.get_experiment, exp_id)
    except NotFound:
        x = None
    ok = (x is not None and x.kind == e.ATTACHED and x.run_token_hash is not None
          and hmac.compare_digest(x.run_token_hash, token_hash(hello.run_token)))
    if not ok:  # one answer for "no such run" and "wrong token": the caller learns nothing
        return f"hello.run_token: not the run token of attached experiment {exp_id}"
    if x.worker_id is not None and hello.worker_id != x.worker_id:
        return f"hello.worker_id: experiment {exp_id}'s session is {x.worker_id!r}, not {hello.worker_id[:80]!r}"
    return ""


def pending_commands(x_id: int, attempt: int, records: list[e.ControlRecord]) -> list[pb.ServerMessage]:
    """Commands still PENDING when an attached session (re)connects: sent again (the SDK
    applies a command id once), since a server restart or a lost stream may have eaten
    them. Replayed ones are in the AttachResponse and apply at their own steps."""
    return [pb.ServerMessage(control=pb.ControlCommand(
        experiment_id=x_id, attempt=attempt, command_id=r.command_id, kind=pb.ControlKind.Value(r.kind),
        value=r.value, hold=r.hold, knob=r.knob))
        for r in records if r.status == e.PENDING and r.source != e.REPLAYED]


__all__ = ["attach", "verify_session", "pending_commands", "token_hash", "SESSION_PREFIX"]
