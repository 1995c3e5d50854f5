"""The artifact store's one interface: content-addressed blobs, written through a
temporary and renamed into place only once their bytes hash to the digest claimed.

A blob's name is its sha256 (hex), so the same bytes are stored once however many
records (code archives, checkpoints, files; see server/store/artifacts.py) name them.
Every method blocks (file or network I/O): the gRPC service calls them in threads,
chunk by chunk, so no file is ever held whole in memory.

Errors: `IntegrityError` (the bytes are not what was claimed: the caller's fault),
`StoreFull` (no space left: the store's), `BlobMissing` (a digest the store lacks).
"""
from __future__ import annotations

import errno
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

CHUNK = 1 << 20  # read size for downloads; uploads arrive in the client's chunks (<= 1 MiB)
TEMP_MAX_AGE_S = 3600.0  # an upload's temporary older than this was abandoned (server killed)

# errnos that mean "the store has no room", not "the request was bad".
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class IntegrityError(ValueError):
    """The uploaded bytes do not match the size or sha256 they were announced with."""


class StoreFull(OSError):
    """The artifact store ran out of space during a write; nothing was kept."""


class BlobMissing(LookupError):
    """No blob with this digest in the store."""

    def __init__(self, digest: str):
        super().__init__(f"blob {digest} is not in the artifact store")
        self.digest = digest


def is_full(exc: BaseException) -> bool:
    return isinstance(exc, StoreFull) or (isinstance(exc, OSError) and exc.errno in FULL_ERRNOS)


class BlobWriter(ABC):
    """One upload in progress: write() the chunks in order, then commit() (checks size and
    sha256, then makes the blob visible under its digest) or abort() (leaves nothing).
    commit() and abort() may each be called once; abort() after commit() is a no-op."""

    # A local file holding the bytes once verify() passed (the temporary, or the stored
    # blob for HashOnly), for checks that need a path; None: make your own copy.
    local_path = None

    def __init__(self, digest: str, size: int):
        self.digest, self.size = digest, size
        self.received = 0
        self._hash = hashlib.sha256()
        self.done = False

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.size:
            raise IntegrityError(f"more bytes than announced: {self.received:,} > size {self.size:,}")
        self._hash.update(data)
        self._write(data)

    def verify(self) -> None:
        """IntegrityError unless everything announced arrived and hashes to the digest."""
        if self.received != self.size:
            raise IntegrityError(f"size: announced {self.size:,} bytes, received {self.received:,}")
        got = self._hash.hexdigest()
        if got != self.digest:
            raise IntegrityError(f"sha256: announced {self.digest}, the bytes received hash to {got}")

    def commit(self) -> None:
        self.verify()
        try:
            self._commit()
        finally:
            self.done = True

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self._abort()

    @abstractmethod
    def _write(self, data: bytes) -> None: ...

    @abstractmethod
    def _commit(self) -> None: ...

    @abstractmethod
    def _abort(self) -> None: ...


class HashOnly(BlobWriter):
    """The blob is already stored: hash the upload to check it, store nothing."""

    def _write(self, data: bytes) -> None:
        pass

    def _commit(self) -> None:
        pass

    def _abort(self) -> None:
        pass


class BlobStore(ABC):
    """Blobs by sha256 hex digest. `url` says where (for logs and `trainctl server`)."""

    url: str

    @abstractmethod
    def writer(self, digest: str, size: int) -> BlobWriter:
        """A new upload of blob `digest` announced as `size` bytes, written to a temporary."""

    @abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abstractmethod
    def size(self, digest: str) -> int:
        """Bytes of the blob; BlobMissing if absent."""

    def read(self, digest: str, offset: int = 0) -> Iterator[bytes]:
        """The blob's bytes from `offset`, in chunks of at most CHUNK; BlobMissing if absent
        (raised on the first next())."""
        try:
            f = self._open(digest)
        except FileNotFoundError:
            raise BlobMissing(digest) from None
        with f:
            if offset:
                f.seek(offset)
            while block := f.read(CHUNK):
                yield block

    @abstractmethod
    def _open(self, digest: str):
        """The blob opened for binary reading; FileNotFoundError if absent."""

    @abstractmethod
    def delete(self, digest: str) -> int:
        """Remove the blob; returns the bytes freed (0 if it was not there)."""

    @abstractmethod
    def digests(self) -> Iterator[str]:
        """Every stored blob's digest (order unspecified)."""

    @abstractmethod
    def clean_temporaries(self, older_than_s: float = TEMP_MAX_AGE_S) -> int:
        """Remove upload temporaries abandoned more than `older_than_s` ago (a server killed
        mid-upload); returns how many."""

    def put(self, chunks, digest: str, size: int) -> int:
        """Write a whole blob from an iterable of chunks (tests, tools); returns its size."""
        w = self.writer(digest, size)
        try:
            for c in chunks:
                w.write(c)
            w.commit()
        except BaseException:
            w.abort()
            raise
        return size

    def close(self) -> None:
        pass
