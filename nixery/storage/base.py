"""The storage interface every backend implements."""

from __future__ import annotations

import hashlib
import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

from nixery.errors import NixeryError

# Marking an entry used records it at most this often (per process for S3).
MARK_INTERVAL = 600

SHA256_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
KEY = re.compile(r"[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*")


class StorageError(NixeryError):
    """The backend failed to read or write."""


def validate_digest(digest: str) -> str:
    """Return the hex part of a sha256 digest; refuse anything else."""
    if not SHA256_DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
    return digest[len("sha256:") :]


def validate_key(key: str) -> str:
    if len(key) > 512 or not KEY.fullmatch(key) or ".." in key:
        raise ValueError(f"invalid storage key: {key[:80]!r}")
    return key


@dataclass(frozen=True)
class BlobLocation:
    """How to serve a blob: a local file, a URL to redirect the client to, or
    neither, when the server must stream it from `Storage.open_blob`."""

    size: int
    path: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class Entry:
    """A stored blob (`name` is its digest) or document (`name` is its key)."""

    name: str
    mtime: float  # when it was written or last marked used
    size: int


@dataclass(frozen=True)
class Lease:
    """A claim on `key` by `holder` until `expires` (seconds since the epoch).

    `token` identifies this very version of the claim (an ETag, a nonce): a
    renewal or release succeeds only while the stored claim is still it."""

    key: str
    holder: str
    expires: float
    token: str

    def fields(self) -> dict[str, str | float]:
        return {"holder": self.holder, "expires": self.expires}

    def to_json(self) -> bytes:
        return json.dumps(self.fields()).encode()


def parse_lease(key: str, data: bytes, token: str) -> Lease:
    """A stored claim; an unreadable one counts as expired (a writer died mid-write)."""
    try:
        fields = json.loads(data)
        return Lease(key, str(fields["holder"]), float(fields["expires"]), token)
    except (ValueError, KeyError, TypeError):
        return Lease(key, "", 0.0, token)


class BlobWriter(ABC):
    """Receives a blob's bytes; nothing is visible until `commit` succeeds."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        self._write(data)
        return len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def commit(self, expected: str | None = None) -> str:
        """Publish the blob under its digest; return that digest."""
        digest = self.digest
        if expected is not None and expected != digest:
            self.abort()
            raise StorageError(f"blob digest {digest} does not match expected {expected}")
        self._commit(digest)
        return digest

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    @abstractmethod
    def _write(self, data: bytes) -> None: ...

    @abstractmethod
    def _commit(self, digest: str) -> None: ...

    @abstractmethod
    def abort(self) -> None:
        """Discard uncommitted data; harmless after commit."""


class Storage(ABC):
    # Leases compare expiry times with this clock (replaceable in tests).
    clock: Callable[[], float] = time.time

    @abstractmethod
    def blob_writer(self) -> BlobWriter: ...

    @abstractmethod
    def locate_blob(self, digest: str) -> BlobLocation | None:
        """Where to serve a blob from, or None if it does not exist."""

    @abstractmethod
    def open_blob(self, digest: str) -> BinaryIO | None: ...

    def open_blob_range(self, digest: str, start: int, end: int) -> BinaryIO | None:
        """A blob positioned at `start`; the caller reads no further than `end`.

        Backends that can fetch a range natively override this."""
        fh = self.open_blob(digest)
        if fh is not None and start:
            fh.seek(start)
        return fh

    @abstractmethod
    def get_document(self, key: str) -> bytes | None: ...

    @abstractmethod
    def put_document(self, key: str, data: bytes) -> None:
        """Atomically replace the document at `key`."""

    def has_document(self, key: str) -> bool:
        """Whether `key` is stored; backends may answer more cheaply than a read."""
        return self.get_document(key) is not None

    def put_cache_document(self, key: str, data: bytes) -> None:
        """Store a document that only saves work (a layer's record): after a
        power loss it may be missing, which costs packing the layer again.
        Backends may skip making it durable; by default it is a document."""
        self.put_document(key, data)

    def sync_blobs(self) -> None:
        """Make every blob committed so far durable. Called before storing a
        document that references blobs; a no-op where each commit is durable."""
        return None

    def spool_dir(self) -> str | None:
        """A local directory where another process of this host may write a
        blob for `adopt_blob`; None where blobs only go through `blob_writer`."""
        return None

    def adopt_blob(self, path: str, digest: str) -> None:
        """Publish the finished file at `path` (in `spool_dir`) as the blob
        `digest`, as a writer's commit would; the file is moved, not copied."""
        raise NotImplementedError(f"{type(self).__name__} has no spool directory")

    def put_blob(self, data: bytes) -> str:
        with self.blob_writer() as writer:
            writer.write(data)
            return writer.commit()

    def read_blob(self, digest: str) -> bytes | None:
        fh = self.open_blob(digest)
        if fh is None:
            return None
        with fh:
            return fh.read()

    def mark_used(self, key: str | None = None, *digests: str) -> None:
        """Note that a document and blobs are in use now, so gc keeps them.

        Cheap and coarse (backends may skip recent marks); a no-op where
        unsupported.
        """
        return None

    def close(self) -> None:
        """Release what this process holds in the storage; nothing by default."""
        return None

    # -- leases -------------------------------------------------------------
    #
    # A lease lets one process of several sharing this storage do a piece of
    # work while the others wait for its result. A backend that cannot make
    # a write conditional grants every lease (`leases_exclusive` is then
    # False): the work may be done twice, which is harmless, because what it
    # stores is content addressed and every write is atomic.

    def leases_exclusive(self) -> bool:
        """Whether a lease held by one process keeps every other one out."""
        return False

    def acquire_lease(self, key: str, holder: str, ttl: float) -> Lease | None:
        """Claim `key` for `ttl` seconds: free, expired or unreadable claims
        are taken; None while another holder's claim is live."""
        return Lease(validate_key(key), holder, self.clock() + ttl, "")

    def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        """Extend a claim for `ttl` seconds from now; None if it was lost
        (it expired and someone else took it, or it is gone)."""
        return Lease(lease.key, lease.holder, self.clock() + ttl, lease.token)

    def release_lease(self, lease: Lease) -> None:
        """Give up a claim, unless it is no longer this one."""
        return None

    def read_lease(self, key: str) -> Lease | None:
        """The current claim on `key` (live or expired), or None."""
        return None

    # -- garbage collection (optional per backend) --------------------------

    def list_blobs(self) -> Iterator[Entry]:
        raise StorageError(f"{type(self).__name__} does not support garbage collection")

    def list_documents(self, prefix: str) -> Iterator[Entry]:
        raise StorageError(f"{type(self).__name__} does not support garbage collection")

    def delete_blob(self, digest: str) -> None:
        raise StorageError(f"{type(self).__name__} does not support garbage collection")

    def delete_document(self, key: str) -> None:
        raise StorageError(f"{type(self).__name__} does not support garbage collection")

    def document_mtime(self, key: str) -> float | None:
        raise StorageError(f"{type(self).__name__} does not support garbage collection")

    def remove_orphan_marks(self, before: float) -> int:
        """Remove use marks made before `before` whose entry the last listings
        did not find (a mark can race with the removal of what it marks);
        return how many. Backends that keep marks apart from entries override it."""
        return 0
