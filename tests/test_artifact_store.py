"""The artifact store in-process: blob stores (a directory, and s3:// through s3fs against
moto's real S3 server process: the same tests, parametrised), the records in the
database, retention and garbage collection (retention.Keeper)."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from trainctl.server.artifacts import open_blob_store
from trainctl.server.artifacts.base import BlobMissing, HashOnly, IntegrityError
from trainctl.server.artifacts.local import LocalBlobStore
from trainctl.server.artifacts.retention import BlobGone, Keeper, keep_count
from trainctl.server.store import entities as E
from trainctl.server.store import open_store
from trainctl.server.store.artifacts import CHECKPOINT, CODE, FILE
from trainctl.server.store.entities import Artifact
from trainctl.server.store.errors import NotFound

pytest_plugins = ["tests.s3"]  # s3_server: moto's S3 server on loopback, one per session


def blob(seed: str, size: int = 3000) -> tuple[bytes, str]:
    data = (seed.encode() * (size // len(seed) + 1))[:size]
    return data, hashlib.sha256(data).hexdigest()


def chunks(data: bytes, n: int = 1000):
    return [data[i:i + n] for i in range(0, len(data), n)]


@pytest.fixture(params=["dir", "s3"])
def blobs(request, tmp_path):
    if request.param == "dir":
        return LocalBlobStore(tmp_path / "artifacts")
    s3 = request.getfixturevalue("s3_server")
    from trainctl.server.artifacts.remote import FsspecBlobStore

    return FsspecBlobStore(s3.url(), s3.storage_options)


def temporaries(blobs) -> list[str]:
    if isinstance(blobs, LocalBlobStore):
        return [p.name for p in blobs.tmp.iterdir()]
    blobs.fs.invalidate_cache()
    try:
        return blobs.fs.find(f"{blobs.root}/tmp")
    except FileNotFoundError:
        return []


# ------------------------------------------------------------------ blob stores

def test_blob_roundtrip_in_chunks_with_offset_and_delete(blobs):
    data, d = blob("weights", 2_500_000)  # more than two read chunks
    assert not blobs.exists(d)
    assert blobs.put(chunks(data, 700_000), d, len(data)) == len(data)
    assert blobs.exists(d) and blobs.size(d) == len(data) and list(blobs.digests()) == [d]
    parts = list(blobs.read(d))
    assert b"".join(parts) == data and max(len(p) for p in parts) <= 1 << 20
    assert b"".join(blobs.read(d, 1_234_567)) == data[1_234_567:]
    assert temporaries(blobs) == []
    assert blobs.delete(d) == len(data) and not blobs.exists(d) and list(blobs.digests()) == []
    assert blobs.delete(d) == 0
    with pytest.raises(BlobMissing):
        next(blobs.read(d))
    with pytest.raises(BlobMissing):
        blobs.size(d)


@pytest.mark.parametrize("fault", ["wrong sha256", "short", "long"])
def test_a_bad_upload_leaves_no_blob_and_no_temporary(blobs, fault):
    data, d = blob("ckpt")
    other = hashlib.sha256(b"something else").hexdigest()
    digest, size, sent = {"wrong sha256": (other, len(data), data), "short": (d, len(data), data[:-1]),
                          "long": (d, len(data) - 1, data)}[fault]
    with pytest.raises(IntegrityError):
        blobs.put(chunks(sent), digest, size)
    assert not blobs.exists(digest) and list(blobs.digests()) == [] and temporaries(blobs) == []


def test_a_stored_blob_is_hashed_not_rewritten_and_still_checked(blobs):
    data, d = blob("code")
    blobs.put([data], d, len(data))
    w = blobs.writer(d, len(data))
    assert isinstance(w, HashOnly)
    w.write(b"x" * len(data))
    with pytest.raises(IntegrityError, match="sha256"):
        w.commit()
    assert b"".join(blobs.read(d)) == data  # the stored bytes are untouched


def test_abandoned_temporaries_are_cleaned(blobs):
    data, d = blob("half")
    if isinstance(blobs, LocalBlobStore):  # a server killed mid-upload leaves its temporary
        w = blobs.writer(d, len(data))
        w.write(data[:100])
        w._f.close()
        old = time.time() - 7200
        os.utime(w.tmp, (old, old))
        fresh = blobs.writer(d, len(data))  # an upload in progress now: kept
        fresh.write(data[:10])
        assert blobs.clean_temporaries() == 1 and len(temporaries(blobs)) == 1
        fresh.abort()
    else:  # S3 shows an object only once complete: plant one, then clean with a cutoff in the future
        blobs.fs.pipe(f"{blobs.root}/tmp/dead.part", data[:100])
        assert blobs.clean_temporaries(older_than_s=3600) == 0
        assert blobs.clean_temporaries(older_than_s=-60) == 1
    assert temporaries(blobs) == []


def test_open_blob_store_picks_the_backend(tmp_path):
    assert isinstance(open_blob_store(str(tmp_path / "a")), LocalBlobStore)
    assert isinstance(open_blob_store(f"file://{tmp_path / 'b'}"), LocalBlobStore)
    from trainctl.server.artifacts.remote import FsspecBlobStore

    assert isinstance(open_blob_store("memory://trainctl-test/x"), FsspecBlobStore)


def test_a_missing_bucket_fails_at_start_naming_it(s3_server):
    from trainctl.server.artifacts.remote import FsspecBlobStore

    with pytest.raises(ValueError, match="no-such-bucket"):
        FsspecBlobStore("s3://no-such-bucket/x", s3_server.storage_options)


# ------------------------------------------------------------------ records, retention, gc

@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path / 'trainctl.db'}")
    yield s
    s.close()


def upload(keeper: Keeper, record: Artifact, data: bytes) -> Artifact:
    w = keeper.blobs.writer(record.sha256, len(data))
    try:
        for c in chunks(data):
            w.write(c)
        return keeper.commit(w, record)
    finally:
        w.abort()


def ckpt(x_id: int, step: int, seed: str | None = None, attempt: int = 1) -> tuple[Artifact, bytes]:
    data, d = blob(seed or f"ckpt-{x_id}-{step}")
    return Artifact(experiment_id=x_id, name=f"ckpt-{step}-a{attempt}.pt", kind=CHECKPOINT, sha256=d,
                    size=len(data), attempt=attempt, step=step), data


def test_records_by_name_replace_and_free_the_old_blob(store, blobs):
    keeper = Keeper(store, blobs)
    x = store.create_experiment("x", {"name": "x"})
    d1, s1 = blob("one")
    d2, s2 = blob("two")
    a = upload(keeper, Artifact(x.id, "model.pt", FILE, s1, len(d1), attempt=1), d1)
    assert (a.experiment_id, a.name, a.kind, a.sha256, a.size) == (x.id, "model.pt", FILE, s1, len(d1))
    assert a.created_at > 0 and store.get_artifact(x.id, "model.pt") == a
    b = upload(keeper, Artifact(x.id, "model.pt", FILE, s2, len(d2), attempt=1), d2)  # same name: replaced
    assert store.list_artifacts(x.id) == [b]
    assert not blobs.exists(s1) and blobs.exists(s2)  # nothing names the old bytes any more
    # Two names, one blob: stored once, freed only when neither needs it.
    upload(keeper, Artifact(x.id, "copy.pt", FILE, s2, len(d2), attempt=1), d2)
    upload(keeper, Artifact(x.id, "model.pt", FILE, s1, len(d1), attempt=1), d1)
    assert blobs.exists(s2) and store.find_artifact(s2).name == "copy.pt"
    with pytest.raises(NotFound):
        store.get_artifact(x.id, "nope")
    with pytest.raises(NotFound):
        store.list_artifacts(999)
    orphan, orphan_sha = blob("orphan")
    with pytest.raises(NotFound):  # no record for an unknown experiment, and its new blob is gone again
        upload(keeper, Artifact(999, "f", FILE, orphan_sha, len(orphan), attempt=1), orphan)
    assert not blobs.exists(orphan_sha)


def test_bad_records_are_refused_naming_the_field(store):
    _, d = blob("z")
    for bad, field in [(Artifact(1, "a/b", FILE, d, 1), "name"), (Artifact(1, "f", FILE, "abc", 1), "sha256"),
                       (Artifact(1, "f", "ARTIFACT_X", d, 1), "kind"), (Artifact(0, "f", FILE, d, 1), "experiment_id"),
                       (Artifact(1, "f", FILE, d, -1), "size")]:
        with pytest.raises(ValueError, match=field):
            store.put_artifact(bad)


def test_checkpoints_keep_the_last_k_by_step(store, blobs):
    keeper = Keeper(store, blobs)
    job = store.create_experiment("job", {"name": "job", "command": "python t.py", "keep_checkpoints": 2},
                                  kind=E.CODE)
    spec_run = store.create_experiment("spec", {"name": "spec", "train": {"keep_checkpoints": 0}})
    kept = {}
    for step in (10, 30, 20, 40):  # out of order: retention goes by step, not by arrival
        for x in (job, spec_run):
            a, data = ckpt(x.id, step)
            upload(keeper, a, data)
            kept.setdefault(x.id, []).append(a.sha256)
    notes, notes_sha = blob("notes")
    upload(keeper, Artifact(job.id, "notes.txt", FILE, notes_sha, len(notes), attempt=1), notes)
    assert [a.step for a in store.list_artifacts(job.id, CHECKPOINT)] == [30, 40]
    assert [a.name for a in store.list_artifacts(job.id, FILE)] == ["notes.txt"]  # user files all kept
    assert [a.step for a in store.list_artifacts(spec_run.id, CHECKPOINT)] == [20, 30, 40]  # 0 -> default 3
    assert store.latest_checkpoint(job.id).step == 40 and store.latest_checkpoint(job.id, 39).step == 30
    assert store.latest_checkpoint(job.id, 29) is None
    assert sorted(blobs.digests()) == sorted(a.sha256 for x in (job, spec_run) for a in store.list_artifacts(x.id))


def test_keep_count_rules():
    def x(spec, state=E.RUNNING, kind=E.SPEC):
        return E.Experiment(1, "x", state, spec, 0, None, None, 1, None, "", {}, 0, 3, 0, 0, None, kind=kind)

    assert keep_count(x({"command": "c", "keep_checkpoints": 0}, E.COMPLETED, E.CODE)) == 0
    assert keep_count(x({"command": "c", "keep_checkpoints": 0}, kind=E.CODE)) == 2  # live: a resume point stays
    assert keep_count(x({"command": "c"}, kind=E.CODE)) == 3 and keep_count(x({"train": {"keep_checkpoints": 5}})) == 5
    assert keep_count(x({"train": {}}, E.FAILED)) == 3 and keep_count(None) == 0
    # An attached run's config is the user's: a key that happens to be called so is not ours.
    assert keep_count(x({"command": "c", "keep_checkpoints": 0}, E.COMPLETED, E.ATTACHED)) == 3


def test_gc_frees_what_nothing_references_and_keeps_submitted_code(store, blobs):
    keeper = Keeper(store, blobs, code_grace_s=0.0)
    used, used_sha = blob("used code")
    unused, unused_sha = blob("unused code")
    for data, sha in ((used, used_sha), (unused, unused_sha)):
        upload(keeper, Artifact(0, sha, CODE, sha, len(data)), data)
    job = store.create_experiment("job", {"name": "job", "command": "c", "keep_checkpoints": 1,
                                          "code_sha256": used_sha}, kind=E.CODE)
    for step in (1, 2, 3):
        upload(keeper, *ckpt(job.id, step))
    store.cancel(job.id, "test")  # final: keep 1 (2 while it was live)
    stray, stray_sha = blob("stray")  # a blob with no record (a crash between blob and record)
    blobs.put([stray], stray_sha, len(stray))
    before = sorted(blobs.digests())

    dry = keeper.collect(dry_run=True)
    assert sorted(blobs.digests()) == before and len(store.list_artifacts(job.id)) == 2
    # retention: one checkpoint beyond the kept one (keep 1 once final; 2 were live); the unused code
    assert dry.artifacts_removed == 2 and dry.blobs_removed == 3 and dry.bytes_freed == 3 * 3000
    real = keeper.collect()
    assert (real.artifacts_removed, real.blobs_removed, real.bytes_freed) == (2, 3, 9000)
    assert [a.step for a in store.list_artifacts(job.id)] == [3]
    assert sorted(blobs.digests()) == sorted([used_sha, store.list_artifacts(job.id)[0].sha256])
    assert store.get_artifact(0, used_sha).kind == CODE
    with pytest.raises(NotFound):
        store.get_artifact(0, unused_sha)
    # Submitted code stays even when its record went (the spec names it).
    store.drop_artifacts([(0, used_sha, used_sha)])
    assert keeper.collect().blobs_removed == 0 and blobs.exists(used_sha)
    assert keeper.collect().artifacts_removed == 0  # nothing left to do


def test_fresh_unsubmitted_code_is_kept_for_the_grace_period(store, blobs):
    keeper = Keeper(store, blobs)  # default grace: an hour to Submit after uploading
    data, sha = blob("just uploaded")
    upload(keeper, Artifact(0, sha, CODE, sha, len(data)), data)
    assert keeper.collect().blobs_removed == 0 and store.find_artifact(sha) is not None


def test_an_upload_whose_stored_blob_was_collected_meanwhile_is_retried(store, blobs):
    keeper = Keeper(store, blobs, code_grace_s=0.0)
    data, sha = blob("racy")
    blobs.put([data], sha, len(data))  # stored, no record
    w = blobs.writer(sha, len(data))
    assert isinstance(w, HashOnly)
    w.write(data)
    keeper.collect()  # collects the unreferenced blob under the upload's feet
    x = store.create_experiment("x", {"name": "x"})
    with pytest.raises(BlobGone):
        keeper.commit(w, Artifact(x.id, "f", FILE, sha, len(data), attempt=1))
    assert store.list_artifacts(x.id) == []
    assert upload(keeper, Artifact(x.id, "f", FILE, sha, len(data), attempt=1), data).sha256 == sha
    assert blobs.exists(sha)


def test_a_store_outage_at_commit_leaves_no_orphan_blob(store, blobs, monkeypatch):
    from trainctl.server.store.errors import StoreUnavailable

    keeper = Keeper(store, blobs)
    x = store.create_experiment("x", {"name": "x"})
    data, sha = blob("outage")

    def down(*a, **kw):
        raise StoreUnavailable("put_artifact", RuntimeError("database is locked"))

    monkeypatch.setattr(store, "put_artifact", down)
    monkeypatch.setattr(store, "referenced", down)  # the store is down for every question
    with pytest.raises(StoreUnavailable):
        upload(keeper, Artifact(x.id, "f", FILE, sha, len(data), attempt=1), data)
    assert list(blobs.digests()) == [] and temporaries(blobs) == []
