"""The default artifact store: a directory on the server.

    <dir>/blobs/sha256/<first two hex digits>/<digest>    the blobs
    <dir>/tmp/<random>.part                               uploads in progress

An upload is written to tmp/ (same file system), fsynced, checked, and renamed into
blobs/: a reader never sees a partial blob, and a failed or killed upload leaves only a
temporary (removed at once on failure, or by `clean_temporaries` after a crash).
"""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .base import TEMP_MAX_AGE_S, BlobMissing, BlobStore, BlobWriter, HashOnly, StoreFull, is_full


class _FileWriter(BlobWriter):
    def __init__(self, store: "LocalBlobStore", digest: str, size: int):
        super().__init__(digest, size)
        self.store = store
        self.tmp = self.local_path = store.tmp / f"{uuid.uuid4().hex}.part"
        self._f = open(self.tmp, "wb")

    def _write(self, data: bytes) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            raise _full(exc) from exc

    def verify(self) -> None:
        super().verify()
        try:
            self._f.flush()  # local_path now holds every byte
        except OSError as exc:
            raise _full(exc) from exc

    def _commit(self) -> None:
        try:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())  # the record will say the blob exists: make it so
            finally:
                self._f.close()
            final = self.store.path(self.digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp, final)  # atomic: same file system
        except OSError as exc:
            self._remove_tmp()
            raise _full(exc) from exc

    def _abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass  # a full disk may fail the final flush too; the file goes anyway
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _full(exc: OSError) -> OSError:
    return StoreFull(exc.errno, f"artifact store full: {exc.strerror or exc}") if is_full(exc) else exc


class LocalBlobStore(BlobStore):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.blobs / digest[:2] / digest

    def writer(self, digest: str, size: int) -> BlobWriter:
        if self.exists(digest):
            w = HashOnly(digest, size)
            w.local_path = self.path(digest)
            return w
        try:
            return _FileWriter(self, digest, size)
        except OSError as exc:
            raise _full(exc) from exc

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobMissing(digest) from None

    def _open(self, digest: str):
        return open(self.path(digest), "rb")

    def delete(self, digest: str) -> int:
        p = self.path(digest)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        return size

    def digests(self) -> Iterator[str]:
        for sub in self.blobs.iterdir():
            if sub.is_dir():
                for p in sub.iterdir():
                    if len(p.name) == 64 and p.is_file():
                        yield p.name

    def clean_temporaries(self, older_than_s: float = TEMP_MAX_AGE_S) -> int:
        cutoff, n = time.time() - older_than_s, 0
        for p in self.tmp.glob("*.part"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n
