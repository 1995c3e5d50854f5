"""Committing uploads, retention and garbage collection: the one place that both makes
blobs visible and frees them, under one lock, so a collection never deletes a blob an
upload is about to record (the commit re-checks a blob it found already stored).

Retention per experiment: the newest K checkpoints (by step) are kept, user files all
kept; K is the job spec's `keep_checkpoints` or a spec run's `train.keep_checkpoints`
(DEFAULT_KEEP when unset or 0: a spec run's 0 means "delete the local copies" and is
also the default, so it cannot mean "keep none in the store"; attached runs: DEFAULT_KEEP). While the run is live at
least LIVE_KEEP stay: the newest may hold steps the store never received, and a resume
then needs the one before it. Code archives stay while an experiment's spec names them;
an unreferenced one goes after CODE_GRACE_S (time to Submit after uploading).

Several server processes sharing one database and bucket would each hold their own
lock: run `trainctl gc` on one of them at a quiet time in that setup.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from trainctl.server.store import entities as E
from trainctl.server.store.artifacts import CHECKPOINT
from trainctl.server.store.entities import Artifact
from trainctl.server.store.errors import NotFound

from .base import BlobMissing, BlobStore, BlobWriter, HashOnly

log = logging.getLogger(__name__)

DEFAULT_KEEP = 3
LIVE_KEEP = 2
CODE_GRACE_S = 3600.0


def keep_count(x: E.Experiment | None) -> int:
    """How many checkpoints of experiment `x` retention keeps (None: it is gone: 0)."""
    if x is None:
        return 0
    spec = x.spec if isinstance(x.spec, dict) else {}
    if x.kind == E.CODE:  # a job spec: its own top-level setting, 0 allowed
        k = spec.get("keep_checkpoints", DEFAULT_KEEP)
    elif x.kind == E.SPEC:
        train = spec.get("train") if isinstance(spec.get("train"), dict) else {}
        k = train.get("keep_checkpoints") or DEFAULT_KEEP
    else:  # an attached run's spec is the user's own config: no setting of ours in it
        k = DEFAULT_KEEP
    if not isinstance(k, (int, float)) or k < 0:
        k = DEFAULT_KEEP
    k = int(k)
    return k if x.is_final else max(k, LIVE_KEEP)


class BlobGone(Exception):
    """The blob an upload found stored was collected before the upload committed; the
    client should retry (it will then be written)."""


@dataclass
class GcReport:
    artifacts_removed: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    temporaries_removed: int = 0
    dropped: list[Artifact] = field(default_factory=list)


class Keeper:
    def __init__(self, store, blobs: BlobStore, *, code_grace_s: float = CODE_GRACE_S):
        self.store, self.blobs = store, blobs
        self.code_grace_s = code_grace_s
        self.lock = threading.Lock()

    # ---------------------------------------------------------------- uploads
    def commit(self, writer: BlobWriter, record: Artifact) -> Artifact:
        """Make the blob visible and record it (blocking: call in a thread). Raises
        IntegrityError (nothing kept), StoreFull, BlobGone, store errors (the new blob is
        removed again: nothing names it)."""
        with self.lock:
            writer.commit()  # verifies size and sha256 first
            if isinstance(writer, HashOnly) and not self.blobs.exists(record.sha256):
                raise BlobGone(f"blob {record.sha256[:12]} was collected during the upload; upload it again")
            try:
                stored, replaced = self.store.put_artifact(record)
            except BaseException:
                # The blob is new (it did not exist when the upload began, and no commit can
                # have recorded it since: commits hold this lock), so nothing names it. Asking
                # the store would fail too when the store is what failed.
                if not isinstance(writer, HashOnly):
                    self.blobs.delete(record.sha256)
                raise
            freed = [replaced] if replaced else []
            if record.kind == CHECKPOINT:
                dropped = self._retain(record.experiment_id)
                freed += [a.sha256 for a in dropped]
            self._free(freed)
            return stored

    def _retain(self, experiment_id: int) -> list[Artifact]:
        try:
            x = self.store.get_experiment(experiment_id)
        except NotFound:
            x = None
        surplus = self.store.surplus_checkpoints(experiment_id, keep_count(x))
        if surplus:
            self.store.drop_artifacts([(a.experiment_id, a.name, a.sha256) for a in surplus])
            log.info("experiment %d: retention dropped %d checkpoint(s): %s", experiment_id, len(surplus),
                     ", ".join(a.name for a in surplus)[:300])
        return surplus

    def _free(self, digests) -> tuple[int, int]:
        """Delete the blobs of `digests` that nothing references any more."""
        n = freed = 0
        for d in dict.fromkeys(digests):
            if not self.store.referenced(d):
                freed += self.blobs.delete(d)
                n += 1
        return n, freed

    # ---------------------------------------------------------------- gc
    def collect(self, dry_run: bool = False) -> GcReport:
        """Apply retention to every experiment, drop code archives nobody submitted, then
        delete every blob no record or experiment references (and abandoned temporaries)."""
        report = GcReport()
        with self.lock:
            for experiment_id, n in self.store.checkpoint_counts().items():
                try:
                    x = self.store.get_experiment(experiment_id)
                except NotFound:
                    x = None
                k = keep_count(x)
                if n > k:
                    report.dropped += self.store.surplus_checkpoints(experiment_id, k)
            report.dropped += self.store.unreferenced_code(time.time() - self.code_grace_s)
            keys = [(a.experiment_id, a.name, a.sha256) for a in report.dropped]
            if dry_run:
                report.artifacts_removed = len(keys)
                wanted = self.store.referenced_digests(excluding=keys)
            else:
                report.artifacts_removed = self.store.drop_artifacts(keys)
                wanted = self.store.referenced_digests()
            for digest in list(self.blobs.digests()):
                if digest in wanted:
                    continue
                try:
                    size = self.blobs.size(digest) if dry_run else self.blobs.delete(digest)
                except BlobMissing:
                    continue
                report.blobs_removed += 1
                report.bytes_freed += size
            if not dry_run:
                report.temporaries_removed = self.blobs.clean_temporaries()
        log.info("artifact gc%s: %d record(s) dropped, %d blob(s) and %d bytes freed, %d temporaries removed",
                 " (dry run)" if dry_run else "", report.artifacts_removed, report.blobs_removed,
                 report.bytes_freed, report.temporaries_removed)
        return report


__all__ = ["Keeper", "GcReport", "BlobGone", "keep_count", "DEFAULT_KEEP", "LIVE_KEEP"]
