"""Submit of a job spec: the user's command on a code archive already in the artifact store.

Kept out of experiments_service.py (which handles spec runs) so each stays one idea.
The validated job spec is stored as the experiment's spec with `code_sha256` set from
the request (never from the user's YAML), and the experiment's kind is CODE.
"""
from __future__ import annotations

import logging
import time

import grpc

from trainctl.jobspec import SHA256_RE, parse_job
from trainctl.server import steering
from trainctl.server.guard import bad_request
from trainctl.server.store import entities as e
from trainctl.server.store.artifacts import CODE
from trainctl.server.store.errors import NotFound
from trainctl.spec import SpecError

log = logging.getLogger(__name__)


async def submit_job(service, raw: dict, code_sha256: str, context) -> e.Experiment:
    """Validate, check the archive is stored, create the CODE experiment and queue it.
    INVALID_ARGUMENT names the bad field; FAILED_PRECONDITION when the archive is unknown."""
    try:
        job = await service.db(parse_job, raw)
    except SpecError as exc:
        await bad_request(context, "Submit", f"invalid job spec: {exc}")
    if code_sha256:   # empty: the command runs in an empty directory (the proto's contract)
        await _check_code(service, code_sha256, context)
    spec = job.to_dict()
    spec.pop("code_sha256", None)   # only the request names the code, never the user's YAML
    if code_sha256:
        spec["code_sha256"] = code_sha256
    try:
        x = await service.db(service.store.create_experiment, job.name, spec, max_restarts=job.max_restarts,
                             gpus=job.resources.gpus, kind=e.CODE, tags=job.tags)
    except ValueError as exc:   # a malformed tag, named by the store
        await bad_request(context, "Submit", f"invalid job spec: {exc}")
    service.dispatcher.kick()
    service.live.experiment_changed(x)
    log.info("experiment %d %r submitted and queued: command %r on code %s", x.id, x.name,
             job.command[:200], code_sha256[:12] or "(none: an empty folder)")
    return x


async def replay_job(service, x: e.Experiment) -> e.Experiment:
    """A new CODE experiment running the same command on the same archive, whose control
    log is `x`'s applied commands, each due at the step it was applied at (the command's
    SDK gets them with its Attach, as scheduled commands)."""
    suffix = f"-replay-of-{x.id}"
    spec = {**x.spec, "name": x.name[:128 - len(suffix)] + suffix}
    applied = steering.replayed_commands(await service.db(service.store.list_controls, x.id))
    y = await service.db(service.store.create_experiment, spec["name"], spec,
                         max_restarts=int(spec.get("max_restarts", 3)),
                         gpus=int((spec.get("resources") or {}).get("gpus") or 0), kind=e.CODE,
                         tags=list(x.tags), replay_of=x.id)
    now = time.time()
    for r in applied:
        await service.db(service.store.add_control, steering.replay_record(r, y.id, now))
    service.dispatcher.kick()
    service.live.experiment_changed(y)
    log.info("experiment %d %r queued, replaying %d commands of experiment %d", y.id, y.name, len(applied), x.id)
    return y


async def _check_code(service, code_sha256: str, context) -> None:
    if not SHA256_RE.match(code_sha256):
        await bad_request(context, "Submit", f"code_sha256: must be 64 lowercase hex digits, "
                                             f"got {code_sha256[:80]!r}")
    try:
        record = await service.db(service.store.get_artifact, 0, code_sha256)
    except NotFound:
        record = None
    if record is None or record.kind != CODE:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"code_sha256: no code archive {code_sha256[:12]} in the artifact store; "
                            f"upload it first (Artifacts.Upload, kind ARTIFACT_CODE; `trainctl submit --code` does)")
