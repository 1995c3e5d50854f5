"""Artifact records in the store (a mixin of SqlAlchemyStore, like KnobsMixin).

A record names bytes held elsewhere: the blob `sha256` in the artifact store
(server/artifacts). Records are keyed by (experiment_id, name), so re-uploading a name
replaces its record (the caller learns the digest it replaced, to free that blob when
nothing else references it). Code archives have experiment_id 0 and their sha256 as
name: the same tree uploaded twice is one record.

Which blobs are still wanted is answered here (`referenced`): every record's sha256 and
every CODE experiment's spec `code_sha256` (a submitted run keeps its code even if its
archive's record were dropped).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from sqlalchemy import delete, func, select

from trainctl.v1 import trainctl_pb2 as pb

from . import dialects
from . import entities as E
from .entities import Artifact
from .errors import NotFound
from .tables import ArtifactModel, ExperimentModel

# Kinds are the proto ArtifactKind names (declared there once); the ones spelled out here
# are checked against it at import.
CODE, CHECKPOINT, FILE = "ARTIFACT_CODE", "ARTIFACT_CHECKPOINT", "ARTIFACT_FILE"
ARTIFACT_KINDS = tuple(name for name, number in pb.ArtifactKind.items() if number)
if {CODE, CHECKPOINT, FILE} - set(ARTIFACT_KINDS):
    raise ImportError(f"server/store/artifacts.py names artifact kinds the proto lacks: "
                      f"{sorted({CODE, CHECKPOINT, FILE} - set(ARTIFACT_KINDS))}")
MAX_ARTIFACT_NAME = 256
_HEX = frozenset("0123456789abcdef")


def is_digest(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX


def check_artifact(a: Artifact) -> None:
    """ValueError naming the field and value for a record the store cannot keep."""
    if a.kind not in ARTIFACT_KINDS:
        raise ValueError(f"artifact.kind: one of {', '.join(ARTIFACT_KINDS)}, got {a.kind!r}")
    if not is_digest(a.sha256):
        raise ValueError(f"artifact.sha256: 64 lowercase hex digits, got {a.sha256[:80]!r}")
    if not a.name or len(a.name) > MAX_ARTIFACT_NAME or not a.name.isprintable() or "/" in a.name \
            or a.name in (".", ".."):
        raise ValueError(f"artifact.name: 1..{MAX_ARTIFACT_NAME} printable characters, no '/', "
                         f"got {a.name[:80]!r}")
    if a.size < 0 or a.step < 0 or a.attempt < 0:
        raise ValueError(f"artifact: size, step and attempt must be >= 0, got {a.size}, {a.step}, {a.attempt}")
    if (a.kind == CODE) != (a.experiment_id == 0):
        raise ValueError(f"artifact.experiment_id: code archives have 0, other kinds their experiment; "
                         f"got {a.experiment_id} for {a.kind}")


def _artifact(row: ArtifactModel) -> Artifact:
    return Artifact(experiment_id=row.experiment_id, name=row.name, kind=row.kind, sha256=row.sha256,
                    size=row.size, attempt=row.attempt, step=row.step, created_at=row.created_at)


_ORDER = (ArtifactModel.kind, ArtifactModel.step, ArtifactModel.name)


class ArtifactsMixin:
    def put_artifact(self, a: Artifact) -> tuple[Artifact, str | None]:
        """Record `a` (created_at now), replacing a record of the same (experiment, name).
        Returns the stored record and the sha256 it replaced (None: new name or same
        bytes). NotFound for an unknown experiment; ValueError naming the field."""
        check_artifact(a)
        with self._session(write=True) as s:
            if a.experiment_id:
                self._experiment_row(s, a.experiment_id)
            # Insert-or-ignore first: two servers on one PostgreSQL recording a new name at
            # once would both find no row to lock and the second insert would fail on the
            # key; this way it waits for the first, then replaces it below.
            values = dict(experiment_id=a.experiment_id, name=a.name, attempt=a.attempt, kind=a.kind,
                          sha256=a.sha256, size=a.size, step=a.step, created_at=time.time())
            t = ArtifactModel.__table__
            if s.execute(dialects.insert(self._dialect, t).values(**values).on_conflict_do_nothing()
                         .returning(t.c.name)).first() is not None:  # (rowcount is -1 here on psycopg)
                return Artifact(**values), None
            row = s.get(ArtifactModel, (a.experiment_id, a.name), with_for_update=True)
            replaced = None
            if row.sha256 != a.sha256:
                replaced = row.sha256
            row.attempt, row.kind, row.sha256, row.size, row.step = a.attempt, a.kind, a.sha256, a.size, a.step
            row.created_at = time.time()
            s.flush()
            return _artifact(row), replaced

    def get_artifact(self, experiment_id: int, name: str) -> Artifact:
        with self._session() as s:
            row = s.get(ArtifactModel, (experiment_id, name))
            if row is None:
                raise NotFound("artifact", f"{name!r} of experiment {experiment_id}")
            return _artifact(row)

    def find_artifact(self, sha256: str) -> Artifact | None:
        """A record of blob `sha256` (a code archive's first), None when nothing has it."""
        stmt = (select(ArtifactModel).where(ArtifactModel.sha256 == sha256)
                .order_by(ArtifactModel.experiment_id, ArtifactModel.name).limit(1))
        with self._session() as s:
            row = s.scalars(stmt).first()
            return _artifact(row) if row is not None else None

    def list_artifacts(self, experiment_id: int, kind: str | None = None) -> list[Artifact]:
        """An experiment's records (0: code archives), by kind, step, name."""
        stmt = select(ArtifactModel).where(ArtifactModel.experiment_id == experiment_id).order_by(*_ORDER)
        if kind:
            stmt = stmt.where(ArtifactModel.kind == kind)
        with self._session() as s:
            if experiment_id:
                self._experiment_row(s, experiment_id)
            return [_artifact(r) for r in s.scalars(stmt)]

    def latest_checkpoint(self, experiment_id: int, max_step: int | None = None) -> Artifact | None:
        """The newest checkpoint of the experiment with step <= max_step (None: any)."""
        stmt = select(ArtifactModel).where(ArtifactModel.experiment_id == experiment_id,
                                           ArtifactModel.kind == CHECKPOINT)
        if max_step is not None:
            stmt = stmt.where(ArtifactModel.step <= max_step)
        stmt = stmt.order_by(ArtifactModel.step.desc(), ArtifactModel.created_at.desc()).limit(1)
        with self._session() as s:
            row = s.scalars(stmt).first()
            return _artifact(row) if row is not None else None

    def checkpoint_counts(self) -> dict[int, int]:
        """experiment_id -> number of checkpoint records (what retention looks at)."""
        stmt = (select(ArtifactModel.experiment_id, func.count()).where(ArtifactModel.kind == CHECKPOINT)
                .group_by(ArtifactModel.experiment_id))
        with self._session() as s:
            return {i: n for i, n in s.execute(stmt)}

    def surplus_checkpoints(self, experiment_id: int, keep: int) -> list[Artifact]:
        """The experiment's checkpoints beyond the newest `keep` (by step, then time)."""
        stmt = (select(ArtifactModel).where(ArtifactModel.experiment_id == experiment_id,
                                            ArtifactModel.kind == CHECKPOINT)
                .order_by(ArtifactModel.step.desc(), ArtifactModel.created_at.desc()).offset(max(keep, 0)))
        with self._session() as s:
            return [_artifact(r) for r in s.scalars(stmt)]

    def unreferenced_code(self, older_than: float) -> list[Artifact]:
        """Code archive records created before `older_than` (unix s) that no experiment's
        spec names: uploaded but never submitted (or whose experiments are gone)."""
        wanted = self._code_in_specs()
        stmt = select(ArtifactModel).where(ArtifactModel.experiment_id == 0, ArtifactModel.kind == CODE,
                                           ArtifactModel.created_at < older_than)
        with self._session() as s:
            return [_artifact(r) for r in s.scalars(stmt) if r.sha256 not in wanted]

    def drop_artifacts(self, keys: Iterable[tuple[int, str, str]]) -> int:
        """Delete records by (experiment_id, name, sha256): a key whose record was
        replaced meanwhile (another sha256) is left alone. Returns how many went."""
        n = 0
        with self._session(write=True) as s:
            for experiment_id, name, sha256 in keys:
                n += s.execute(delete(ArtifactModel).where(
                    ArtifactModel.experiment_id == experiment_id, ArtifactModel.name == name,
                    ArtifactModel.sha256 == sha256)).rowcount or 0
        return n

    def referenced(self, sha256: str) -> bool:
        """Whether any record or CODE experiment still wants blob `sha256`."""
        with self._session() as s:
            if s.scalars(select(ArtifactModel.experiment_id).where(ArtifactModel.sha256 == sha256).limit(1)).first() \
                    is not None:
                return True
        return sha256 in self._code_in_specs()

    def referenced_digests(self, excluding: Iterable[tuple[int, str, str]] = ()) -> set[str]:
        """Every blob digest something still wants (records and CODE experiments),
        counting the records keyed (experiment_id, name, sha256) in `excluding` as gone
        (what a dry-run collection asks)."""
        skip = set(excluding)
        stmt = select(ArtifactModel.experiment_id, ArtifactModel.name, ArtifactModel.sha256)
        with self._session() as s:
            if skip:
                digests = {d for i, n, d in s.execute(stmt) if (i, n, d) not in skip}
            else:
                digests = set(s.scalars(select(ArtifactModel.sha256).distinct()))
        return digests | self._code_in_specs()

    def _code_in_specs(self) -> set[str]:
        # The code sha256 lives in the job spec (no column): read the specs of CODE runs only.
        stmt = select(ExperimentModel.spec).where(ExperimentModel.kind == E.CODE).execution_options(yield_per=500)
        with self._session() as s:
            return {spec.get("code_sha256") for spec in s.scalars(stmt)
                    if isinstance(spec, dict) and spec.get("code_sha256")}
