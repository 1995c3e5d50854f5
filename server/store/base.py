"""The store interface the server programs against.

One implementation exists (`SqlAlchemyStore`, SQLite or PostgreSQL), but services and
the dispatcher depend only on this class, so tests and alternative back ends can swap
it. Every method is safe to call from several threads at once and returns plain
entities (see `entities.py`); errors are the `StoreError` subclasses in `errors.py`.

Fencing: every call a worker's message leads to carries `(experiment_id, attempt)`.
A call is accepted only from the experiment's live run: `attempt` equals the current
attempt and the store has not taken the experiment away from that run since (requeue
after a lease expiry). Anything else raises `StaleAttempt`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Iterable, Sequence

from .entities import ControlRecord, Experiment, Knob, MetricRow, MetricSeries, Worker


class AbstractStore(ABC):
    # ---------------------------------------------------------------- experiments

    @abstractmethod
    def create_experiment(
        self,
        name: str,
        spec: dict,
        *,
        max_restarts: int = 3,
        gpus: int = 0,
        replay_of: int | None = None,
        kind: str = "SPEC",
        tags: Sequence[str] = (),
    ) -> Experiment:
        """Store a new experiment in state QUEUED with attempt 0 (kind SPEC or CODE)."""

    @abstractmethod
    def get_experiment(self, id: int) -> Experiment:
        """The experiment `id`; NotFound if there is none."""

    @abstractmethod
    def list_experiments(self, states: Sequence[str] | None = None, limit: int = 100, *,
                         tags: Sequence[str] | None = None, before_id: int | None = None) -> list[Experiment]:
        """Up to `limit` experiments, newest first, optionally only those in `states`
        and only those carrying every one of `tags`. `before_id` pages by key: only
        ids < before_id (pass the last id of the previous page)."""

    @abstractmethod
    def annotate(self, id: int, *, add_tags: Sequence[str] = (), remove_tags: Sequence[str] = (),
                 note: str | None = None) -> Experiment:
        """Add and remove tags (a tag both added and removed is removed) and, unless
        `note` is None, replace the note. NotFound; ValueError naming the field for a
        bad tag, too many tags or too long a note (see `tags.py`)."""

    @abstractmethod
    def claim_next(self, worker_id: str, free_gpus: int, *, accepts_code: bool = True) -> Experiment | None:
        """Atomically assign the oldest QUEUED experiment needing <= `free_gpus` GPUs
        (and, unless `accepts_code`, not a CODE one: `trainctl worker --no-code`).

        It becomes ASSIGNED to `worker_id` with attempt + 1. Returns None when nothing
        fits. Concurrent callers never get the same experiment.
        """

    @abstractmethod
    def transition(
        self,
        id: int,
        attempt: int,
        state: str,
        *,
        message: str = "",
        summary: dict[str, float] | None = None,
    ) -> Experiment:
        """Move the live run to `state` (a worker's StateUpdate).

        Legal: ASSIGNED->RUNNING and ASSIGNED/RUNNING->COMPLETED/FAILED/CANCELLED;
        repeating the current state is a no-op (a resent message). Sets started_at on
        the first RUNNING, finished_at on a final state; `message` replaces the stored
        message and `summary`, when given, the stored summary.
        Raises StaleAttempt (fenced) or InvalidTransition.
        """

    @abstractmethod
    def requeue(self, id: int, attempt: int, reason: str, *, count_restart: bool = True) -> Experiment:
        """Take the experiment away from run `attempt` (lease expired, worker gave it back).

        Back to QUEUED (restarts + 1 when `count_restart`) while restarts remain,
        otherwise FAILED with "{reason}; gave up after {max_restarts} restarts".
        Either way the run is fenced from then on. A graceful hand-back passes
        `count_restart=False` and is always requeued.
        """

    @abstractmethod
    def cancel(self, id: int, reason: str) -> Experiment:
        """QUEUED/ASSIGNED/RUNNING -> CANCELLED (a client's Cancel); InvalidTransition if final.

        worker_id is kept so the server knows whom to tell to stop.
        """

    # Whenever transition, requeue (giving up) or cancel makes an experiment final, its
    # PENDING commands end EXPIRED with the reason in the same transaction; the caller
    # finds them with list_controls(id, status=EXPIRED) (only a run's end expires any).

    # ---------------------------------------------------------------- metrics

    @abstractmethod
    def add_metrics(
        self,
        experiment_id: int,
        attempt: int,
        scope: str,
        names: Sequence[str],
        rows: Iterable[tuple[int, int, float, Sequence[float]]],
    ) -> int:
        """Store a batch of rows `(step, epoch, wall_time, values)`; values[i] is names[i].

        NaN values are absent and skipped. Idempotent: a point already stored for
        (experiment, scope, step, name) is only replaced by one from the same or a later
        attempt (a resumed run recomputing a step). Raises StaleAttempt when fenced.
        Returns the number of points in the batch (non-NaN values).
        """

    def urgent(self) -> AbstractContextManager:
        """A context for a call that a client waits on (a control command until its ack):
        while it is open, add_metrics steps aside between parts, within bounds
        (writelock.Urgency). Not a store call: cheap and safe on the event loop."""
        return nullcontext()

    @abstractmethod
    def get_metrics(
        self,
        id: int,
        *,
        scope: str | None = None,
        names: Sequence[str] | None = None,
        from_step: int = 0,
        to_step: int | None = None,
    ) -> list[MetricSeries]:
        """Series with from_step <= step <= to_step, ordered by name, scope, step."""

    def get_metrics_downsampled(
        self,
        id: int,
        max_points: int,
        *,
        scope: str | None = None,
        names: Sequence[str] | None = None,
        from_step: int = 0,
        to_step: int | None = None,
    ) -> tuple[list[MetricSeries], int]:
        """get_metrics with at most `max_points` points per series, min/max preserving.

        Returns (series, number of points in the range before downsampling). Each
        series keeps its first and last points and the minimum and maximum of each of
        (max_points - 2) // 2 consecutive stretches; `max_points <= 0` keeps everything.
        This default reads every point and downsamples them (`downsample_minmax`);
        SqlAlchemyStore answers long series from its min/max rollup instead.
        """
        from trainctl.server.downsample import downsample_minmax

        series = self.get_metrics(id, scope=scope, names=names, from_step=from_step, to_step=to_step)
        total = sum(len(s.steps) for s in series)
        out = []
        for s in series:
            if 0 < max_points < len(s.steps):
                epoch_of = dict(zip(s.steps, s.epochs))
                steps, values = downsample_minmax(s.steps, s.values, max_points)
                s = MetricSeries(s.name, s.scope, steps, [epoch_of[st] for st in steps], values)
            out.append(s)
        return out, total

    def wall_times(self, id: int, steps: Sequence[int]) -> dict[int, float]:
        """{step: wall_time} of the STEP rows at `steps` (at most 5,000 of them): anchors
        for a wall-time axis under a downsampled series. This default reads the rows."""
        want = set(steps)
        return {r.step: r.wall_time for r in self.metric_rows(id, scope="STEP") if r.step in want}

    @abstractmethod
    def count_metrics(self, id: int) -> int:
        """Number of points stored for the experiment."""

    @abstractmethod
    def metric_rows(
        self,
        id: int,
        *,
        scope: str | None = None,
        from_step: int = 0,
        to_step: int | None = None,
    ) -> list[MetricRow]:
        """Points regrouped into rows by (scope, step), ordered by step, STEP before EPOCH."""

    # ---------------------------------------------------------------- controls

    @abstractmethod
    def add_control(self, record: ControlRecord) -> ControlRecord:
        """Persist a command. Its key is (experiment_id, command_id): if it exists with the
        same kind, value and hold, return the stored record (an idempotent retry); with
        other content raise AlreadyExists. A PENDING command for an experiment already
        final is stored EXPIRED. NotFound if the experiment does not exist."""

    @abstractmethod
    def resolve_control(
        self,
        experiment_id: int,
        command_id: str,
        *,
        status: str,
        applied_step: int | None = None,
        old_value: float | None = None,
        new_value: float | None = None,
        message: str = "",
        applied_at: float | None = None,
        consequence: str = "",
    ) -> ControlRecord:
        """Record the worker's answer to a PENDING command of `experiment_id` (applied_at
        defaults to now); NotFound if that experiment has no such command.

        A command already resolved is returned unchanged: the first answer is the
        audited one, a duplicate ack must not rewrite it.
        """

    @abstractmethod
    def list_controls(self, experiment_id: int, *, status: str | None = None) -> list[ControlRecord]:
        """The experiment's commands ordered by (applied_step or at_step), requested_at.

        Commands with neither (LIVE and still PENDING) come last.
        """

    # ---------------------------------------------------------------- attached runs and knobs
    # (SqlAlchemyStore: store/knobs.py). Not abstract, so other stores need not have them.

    def create_attached(self, name: str, config: dict, *, session_suffix: str, run_token_hash: str,
                        tags: Sequence[str] = (), replay_of: int | None = None) -> Experiment:
        """A new ATTACHED experiment, directly ASSIGNED (attempt 1) to the session
        "attached-<id>-<session_suffix>". claim_next never returns an ATTACHED run, and
        requeue ends one FAILED (no worker can run the user's process instead)."""
        raise NotImplementedError

    def declare_knobs(self, experiment_id: int, attempt: int, knobs: Sequence[Knob]) -> list[Knob]:
        """Store the run's knob declarations (fenced like add_metrics); all its knobs."""
        raise NotImplementedError

    def set_knob_value(self, experiment_id: int, name: str, value: float) -> Knob:
        """An APPLIED SET_KNOB: the knob's current value; NotFound for an unknown knob."""
        raise NotImplementedError

    def list_knobs(self, experiment_id: int) -> list[Knob]:
        """The run's declared knobs ordered by name."""
        raise NotImplementedError

    # ---------------------------------------------------------------- lineage and counts

    @abstractmethod
    def store_id(self) -> str:
        """A random id made once when the database was created: names this store in
        checkpoint lineage (a fresh database never resumes another's checkpoints)."""

    @abstractmethod
    def delivered(self, experiment_id: int) -> tuple[int, int]:
        """(steps, epochs): every STEP row 0..steps-1 and every EPOCH row of epoch index
        0..epochs-1 is stored (the contiguous prefixes). Cheap on long runs."""

    @abstractmethod
    def count_by_state(self) -> dict[str, int]:
        """Number of experiments per state (states with none are absent)."""

    # ---------------------------------------------------------------- workers

    @abstractmethod
    def upsert_worker(self, id: str, hostname: str, devices: list[dict]) -> Worker:
        """Register a worker (its Hello) or refresh it; marks it connected, seen now."""

    @abstractmethod
    def mark_worker(self, id: str, connected: bool) -> Worker:
        """Set the worker's connected flag and last_seen = now; NotFound if unknown."""

    @abstractmethod
    def list_workers(self) -> list[Worker]:
        """Every worker ever seen, ordered by id."""

    # ---------------------------------------------------------------- lifecycle

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""

    def __enter__(self) -> "AbstractStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
