"""Attached runs and knobs in the store (a mixin of SqlAlchemyStore, like ControlsMixin).

An ATTACHED experiment is the user's own loop speaking through the SDK: it is created
directly ASSIGNED (attempt 1) to a session the server names, so no worker ever claims
it (claim_next skips the kind too, belt and braces), and it can never be requeued: a
lost session ends it FAILED (`SqlAlchemyStore.requeue`).

Knobs are the floats a run declared steerable. A declaration comes from the run (fenced
by experiment and attempt like its metrics); the value then changes only through an
APPLIED SET_KNOB ack (`set_knob_value`), so the stored value is what the run holds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from sqlalchemy import select

from . import entities as E
from .convert import experiment as _experiment
from .entities import Experiment, Knob
from .errors import NotFound
from .tables import ExperimentModel, ExperimentTagModel, KnobModel
from .tags import check_tags

MAX_KNOBS = 256  # knobs per experiment (each is a row and a line of `trainctl get`)
MAX_KNOB_NAME = 128


def check_knob(field: str, k: Knob) -> None:
    """ValueError naming the field and value for a knob the store cannot keep."""
    if not k.name or len(k.name) > MAX_KNOB_NAME or not k.name.isprintable():
        raise ValueError(f"{field}.name: a knob name is 1..{MAX_KNOB_NAME} printable characters, got {k.name[:140]!r}")
    for part in ("value", "low", "high"):
        v = getattr(k, part)
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{field}.{part}: must be finite, got {v}")
    if k.low is not None and k.high is not None and k.low > k.high:
        raise ValueError(f"{field}: low {k.low:g} > high {k.high:g}")
    if (k.low is not None and k.value < k.low) or (k.high is not None and k.value > k.high):
        raise ValueError(f"{field}.value: {k.value:g} is outside [{k.low}, {k.high}]")


def _knob(row: KnobModel) -> Knob:
    return Knob(name=row.name, value=row.value, low=row.low, high=row.high)


class KnobsMixin:
    def create_attached(self, name: str, config: dict, *, session_suffix: str, run_token_hash: str,
                        tags: Sequence[str] = (), replay_of: int | None = None) -> Experiment:
        """A new ATTACHED experiment, ASSIGNED with attempt 1 to the session
        "attached-<id>-<session_suffix>" (started_at set: the loop is running).
        Idempotent on `run_token_hash`: when an attached run already has it (the SDK
        retrying an Attach whose reply was lost, its token being its attach key), that
        run is returned unchanged; the caller tells by its worker id's suffix."""
        tags = check_tags("tags", tags)
        with self._session(write=True) as s:
            same = s.scalars(select(ExperimentModel).where(ExperimentModel.kind == E.ATTACHED,
                                                           ExperimentModel.run_token_hash == run_token_hash)).first()
            if same is not None:
                return _experiment(same)
            if replay_of is not None:
                self._experiment_row(s, replay_of)
            now = time.time()
            row = ExperimentModel(name=name, state=E.ASSIGNED, spec=config, created_at=now, started_at=now,
                                  attempt=1, message="", summary={}, last_step=0, max_restarts=0, restarts=0,
                                  gpus=0, replay_of=replay_of, kind=E.ATTACHED, run_token_hash=run_token_hash)
            s.add(row)
            s.flush()  # assigns the id the session is named after
            row.worker_id = f"attached-{row.id}-{session_suffix}"
            row.tag_rows = [ExperimentTagModel(experiment_id=row.id, tag=t) for t in sorted(set(tags))]
            s.flush()
            return _experiment(row)

    def declare_knobs(self, experiment_id: int, attempt: int, knobs: Sequence[Knob]) -> list[Knob]:
        """The run declares (or re-declares) knobs: each row takes the run's value and
        bounds. Fenced like metrics (StaleAttempt). Returns every knob of the run."""
        for i, k in enumerate(knobs):
            check_knob(f"knobs[{i}]", k)
        with self._session(write=True) as s:
            row = self._experiment_row(s, experiment_id, lock=True)
            self._check_live(experiment_id, attempt, row.attempt, row.worker_id)
            have = {r.name: r for r in s.scalars(select(KnobModel).where(KnobModel.experiment_id == experiment_id))}
            new = {k.name for k in knobs} - set(have)
            if len(have) + len(new) > MAX_KNOBS:
                raise ValueError(f"knobs: experiment {experiment_id} would have {len(have) + len(new)} knobs; "
                                 f"at most {MAX_KNOBS}")
            for k in knobs:
                r = have.get(k.name)
                if r is None:
                    r = have[k.name] = KnobModel(experiment_id=experiment_id, name=k.name)
                    s.add(r)
                r.value, r.low, r.high = float(k.value), k.low, k.high
            return [_knob(have[n]) for n in sorted(have)]

    def set_knob_value(self, experiment_id: int, name: str, value: float) -> Knob:
        """The run applied a SET_KNOB: the knob's current value becomes `value`."""
        with self._session(write=True) as s:
            row = s.get(KnobModel, (experiment_id, name), with_for_update=True)
            if row is None:
                raise NotFound("knob", f"{name!r} of experiment {experiment_id}")
            row.value = float(value)
            return _knob(row)

    def list_knobs(self, experiment_id: int) -> list[Knob]:
        """The run's declared knobs, by name (NotFound for no such experiment)."""
        with self._session() as s:
            self._experiment_row(s, experiment_id)
            rows = s.scalars(select(KnobModel).where(KnobModel.experiment_id == experiment_id)
                             .order_by(KnobModel.name))
            return [_knob(r) for r in rows]
