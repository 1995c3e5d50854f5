"""The artifact store on any fsspec URL: `s3://bucket/prefix` (through s3fs) for teams,
or gcs://, az://, memory://... with the matching fsspec package installed.

Same layout as the directory store, under the URL:

    <url>/blobs/sha256/<first two hex digits>/<digest>
    <url>/tmp/<random>.part

An upload streams into tmp/ (for S3 a multipart upload, so memory stays at one part of
PART_BYTES whatever the file size), is checked, then moved into blobs/ (S3: a
server-side copy and a delete). Objects appear whole or not at all, so a reader never
sees a partial blob; an abandoned temporary is removed by `clean_temporaries`.

Credentials and endpoint come from the usual environment of the backend (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL
for an S3-compatible server) or from `storage_options`.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime

from .base import CHUNK, TEMP_MAX_AGE_S, BlobMissing, BlobStore, BlobWriter, HashOnly, StoreFull, is_full

PART_BYTES = 8 << 20  # S3 multipart part size (>= 5 MiB); bounds the memory of one upload


def _full(exc: OSError) -> OSError:
    return StoreFull(exc.errno, f"artifact store full: {exc}") if is_full(exc) else exc


class _RemoteWriter(BlobWriter):
    def __init__(self, store: "FsspecBlobStore", digest: str, size: int):
        super().__init__(digest, size)
        self.store = store
        self.tmp = f"{store.root}/tmp/{uuid.uuid4().hex}.part"
        self._f = store.fs.open(self.tmp, "wb", block_size=PART_BYTES)
        self._closed = False

    def _write(self, data: bytes) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            raise _full(exc) from exc

    def _commit(self) -> None:
        fs = self.store.fs
        try:
            self._closed = True
            self._f.close()  # completes the multipart upload: the temporary now exists whole
            fs.mv(self.tmp, self.store.path(self.digest))
        except OSError as exc:
            self._remove_tmp()
            raise _full(exc) from exc
        except BaseException:
            self._remove_tmp()
            raise
        finally:
            fs.invalidate_cache()

    def _abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                # Drop the multipart upload rather than complete it (s3fs: discard()), and
                # mark the file closed so its finaliser does not try to complete it.
                discard = getattr(self._f, "discard", None)
                if discard is not None:
                    discard()
                    self._f.closed = True
                else:
                    self._f.close()
            except Exception:
                pass
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        try:
            self.store.fs.rm_file(self.tmp)
        except (FileNotFoundError, OSError):
            pass
        self.store.fs.invalidate_cache()


class FsspecBlobStore(BlobStore):
    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec  # here: the directory store needs no fsspec backend

        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if self.protocol in ("file", "local"):  # a local path: make the folders like local.py
            self.fs.makedirs(f"{self.root}/blobs/sha256", exist_ok=True)
            self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        else:  # object stores: fail at start, not at the first upload, when the bucket is not there
            bucket = self.root.split("/", 1)[0]
            if not self.fs.exists(bucket):
                raise ValueError(f"--artifacts {url}: bucket or container {bucket!r} does not exist "
                                 f"(or these credentials cannot see it)")

    def path(self, digest: str) -> str:
        return f"{self.root}/blobs/sha256/{digest[:2]}/{digest}"

    def writer(self, digest: str, size: int) -> BlobWriter:
        if self.exists(digest):
            return HashOnly(digest, size)
        return _RemoteWriter(self, digest, size)

    def exists(self, digest: str) -> bool:
        self.fs.invalidate_cache()  # a listing cached earlier must not answer for a new blob
        return self.fs.isfile(self.path(digest))

    def size(self, digest: str) -> int:
        self.fs.invalidate_cache()
        try:
            return int(self.fs.size(self.path(digest)))
        except FileNotFoundError:
            raise BlobMissing(digest) from None

    def _open(self, digest: str):
        return self.fs.open(self.path(digest), "rb", block_size=4 * CHUNK)

    def delete(self, digest: str) -> int:
        try:
            size = self.size(digest)
            self.fs.rm_file(self.path(digest))
        except (BlobMissing, FileNotFoundError):
            return 0
        finally:
            self.fs.invalidate_cache()
        return size

    def digests(self) -> Iterator[str]:
        self.fs.invalidate_cache()
        try:
            paths = self.fs.find(f"{self.root}/blobs/sha256")
        except FileNotFoundError:
            return
        for p in paths:
            name = p.rsplit("/", 1)[-1]
            if len(name) == 64:
                yield name

    def clean_temporaries(self, older_than_s: float = TEMP_MAX_AGE_S) -> int:
        cutoff, n = time.time() - older_than_s, 0
        self.fs.invalidate_cache()
        try:
            paths = self.fs.find(f"{self.root}/tmp")
        except FileNotFoundError:
            return 0
        for p in paths:
            if not p.endswith(".part"):
                continue
            try:
                modified = self.fs.modified(p)
                stamp = modified.timestamp() if isinstance(modified, datetime) else float(modified)
            except (NotImplementedError, FileNotFoundError, OSError):
                continue
            if stamp < cutoff:
                try:
                    self.fs.rm_file(p)
                    n += 1
                except FileNotFoundError:
                    pass
        return n
