"""The artifact store: code archives, checkpoints and user files, content-addressed.

    blobs = open_blob_store("/var/lib/trainctl/artifacts")   # or "s3://bucket/prefix"

Blobs (the bytes, by sha256) live in a `BlobStore` (a directory, or any fsspec URL);
the records that name them (experiment, name, kind, step) live in the database
(server/store/artifacts.py). `service.ArtifactsService` is the gRPC face,
`retention.Keeper` the one place that commits uploads and frees blobs.
"""
from __future__ import annotations

from pathlib import Path

from .base import BlobMissing, BlobStore, IntegrityError, StoreFull


def default_location(db_url: str) -> str:
    """`<db dir>/artifacts` for a SQLite file, else ./artifacts."""
    db_file = sqlite_file(db_url)
    return str((db_file.parent if db_file else Path()).resolve() / "artifacts")


def sqlite_file(db_url: str) -> Path | None:
    """The database file of a SQLite URL (or bare path); None for any other store."""
    url = db_url if "://" in db_url else f"sqlite:///{db_url}"
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url[len("sqlite:///"):]).expanduser()
    return None


def open_blob_store(location: str, storage_options: dict | None = None) -> BlobStore:
    """A directory path (or file://) -> LocalBlobStore; any other URL -> FsspecBlobStore."""
    if location.startswith("file://"):
        location = location[len("file://"):]
    if "://" in location:
        from .remote import FsspecBlobStore

        return FsspecBlobStore(location, storage_options)
    from .local import LocalBlobStore

    return LocalBlobStore(location)


__all__ = ["BlobStore", "BlobMissing", "IntegrityError", "StoreFull", "open_blob_store", "default_location"]
