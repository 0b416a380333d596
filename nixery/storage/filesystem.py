"""Blobs and documents in a local directory.

Layout: `blobs/sha256/<hex>`, `documents/<key>`, `tmp/<writer>/` for writes
in progress. Every write goes to a temp file in the same file system, then
is renamed into place, so a reader never sees half a file.

Durability (power loss, not just a killed process): a blob's data is
fsynced before its rename; the blob directory is fsynced once per image
(`sync_blobs`, before the image record is stored) rather than after every
blob; a document is fsynced with its directory, except layer records
(`put_cache_document`): a lost or empty one is ignored and the layer packed
again, and a record whose blob was lost is ignored too (its blobs are
located before it is used).

Crash safety: each process writes in its own `tmp/<writer>/` directory and
holds an exclusive lock on `tmp/<writer>.lock` while it lives; at start, the
directories whose lock is free belonged to dead processes and are removed
(in the background: nothing in `tmp/` is ever served).
Leases (see `Storage.acquire_lease`) are files under `leases/`, made with
a hard link from a complete temp file, which fails if the name exists (the
O_EXCL of a file with content). Renewing, releasing or taking over an
expired lease replaces or removes a file someone else may be looking at, so
these hold an exclusive lock on `leases/.guard` for the few system calls
they take: compare the stored claim, then swap it.

A blob is hashed again the first time this process reads it (blobs it wrote
itself excepted), and one that does not match its digest is deleted, so
whatever a crash, a full disk or bit rot left behind is never served.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from nixery.singleflight import SingleFlight
from nixery.storage.base import (
    MARK_INTERVAL,
    BlobLocation,
    BlobWriter,
    Entry,
    Lease,
    Storage,
    StorageError,
    parse_lease,
    validate_digest,
    validate_key,
)

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
STALE_CLAIM = 3600  # a lock file never published is garbage after this
_FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _storage_error(what: str, exc: OSError) -> StorageError:
    if exc.errno in _FULL_DISK:
        return StorageError(f"{what} failed: storage is full ({exc.strerror}); nothing was stored")
    return StorageError(f"{what} failed: {exc}")


class _FileBlobWriter(BlobWriter):
    def __init__(self, storage: FilesystemStorage):
        super().__init__()
        self._storage = storage
        try:
            fd, name = tempfile.mkstemp(dir=storage.tmp_dir, prefix="blob-")
        except OSError as exc:
            raise _storage_error("creating a blob", exc) from exc
        self._tmp: str | None = name
        self._fh = os.fdopen(fd, "wb")

    def _write(self, data: bytes) -> None:
        try:
            self._fh.write(data)
        except OSError as exc:
            self.abort()
            raise _storage_error("writing a blob", exc) from exc

    def _commit(self, digest: str) -> None:
        assert self._tmp is not None, "blob writer already finished"
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._storage.publish_blob(self._tmp, digest)
            self._tmp = None
        except OSError as exc:
            self.abort()
            raise _storage_error("storing a blob", exc) from exc

    def abort(self) -> None:
        if not self._fh.closed:
            try:
                self._fh.close()
            except OSError:
                pass  # the flush of a full disk fails again; the file goes anyway
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
            self._tmp = None


class SpoolFile:
    """A blob written into a spool directory (`FilesystemStorage.spool_dir`),
    possibly by another process, and hashed on the way; the storage then
    publishes it with `adopt_blob`."""

    def __init__(self, directory: str):
        try:
            fd, self.path = tempfile.mkstemp(dir=directory, prefix="blob-")
        except OSError as exc:
            raise _storage_error("creating a blob", exc) from exc
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        try:
            self._file.write(data)
        except OSError as exc:
            raise _storage_error("writing a blob", exc) from exc

    def finish(self) -> str:
        """Close the file; its digest."""
        try:
            self._file.close()
        except OSError as exc:
            raise _storage_error("writing a blob", exc) from exc
        return "sha256:" + self._hash.hexdigest()

    def discard(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # the flush of a full disk fails again; the file goes anyway
        Path(self.path).unlink(missing_ok=True)


class FilesystemStorage(Storage):
    def __init__(
        self,
        root: str | os.PathLike[str],
        verify: bool = True,
        clean_tmp: bool = True,
        mark_interval: float = MARK_INTERVAL,
    ):
        self.root = Path(root)
        self.mark_interval = mark_interval
        self.blob_dir = self.root / "blobs" / "sha256"
        self.doc_dir = self.root / "documents"
        self.tmp_root = self.root / "tmp"
        self.lease_dir = self.root / "leases"
        for d in (self.blob_dir, self.doc_dir, self.tmp_root, self.lease_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.verify = verify
        # Blobs renamed into place since the blob directory was last fsynced.
        self._unsynced = False
        self._sync_lock = threading.Lock()
        self._verified: set[str] = set()
        self._verified_lock = threading.Lock()
        self._verifying: SingleFlight[bool] = SingleFlight()
        self.tmp_dir, self._lock_fd = self._claim_tmp_dir()
        # Removing a crash's leftovers can take long on a slow disk, and
        # nothing in tmp/ is ever served: do it without delaying the start.
        self.removed_tmp = 0
        self.cleaned = threading.Event()
        if clean_tmp:
            threading.Thread(target=self._clean_tmp, name="tmp-cleanup", daemon=True).start()
        else:
            self.cleaned.set()

    # -- temp files -------------------------------------------------------

    def _claim_tmp_dir(self) -> tuple[Path, int]:
        # The lock is taken under a name others ignore, then published, so no
        # one ever sees this writer's lock file unlocked.
        name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        claiming = self.tmp_root / f"{name}.lock.new"
        fd = os.open(claiming, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(claiming, self.tmp_root / f"{name}.lock")
        path = self.tmp_root / name
        path.mkdir()
        return path, fd

    def _clean_tmp(self) -> None:
        try:
            self.removed_tmp = self._remove_stale_tmp()
        except OSError as exc:
            log.error("cleaning %s failed: %s", self.tmp_root, exc)
        finally:
            self.cleaned.set()

    def _remove_stale_tmp(self) -> int:
        """Remove what dead writers left in `tmp/`; return how many entries went."""
        removed = 0
        for entry in sorted(os.scandir(self.tmp_root), key=lambda e: not e.name.endswith(".lock")):
            path = Path(entry.path)
            if entry.name.endswith(".lock"):
                if path.with_suffix("") == self.tmp_dir or not _lock_is_free(path):
                    continue
                shutil.rmtree(path.with_suffix(""), ignore_errors=True)
                path.unlink(missing_ok=True)
            elif entry.name.endswith(".lock.new"):
                if not _older_than(path, STALE_CLAIM):
                    continue
                path.unlink(missing_ok=True)
            elif entry.is_dir(follow_symlinks=False):
                # Gone with its lock above, or still locked by a live writer.
                if not path.exists() or (self.tmp_root / f"{entry.name}.lock").exists():
                    continue
                shutil.rmtree(path, ignore_errors=True)  # its writer died before locking
            else:
                path.unlink(missing_ok=True)  # from a layout without writer dirs
            removed += 1
        if removed:
            log.info("removed %d stale temporary entries from %s", removed, self.tmp_root)
        return removed

    def close(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        (self.tmp_root / f"{self.tmp_dir.name}.lock").unlink(missing_ok=True)
        os.close(self._lock_fd)

    # -- blobs ------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / validate_digest(digest)

    def blob_writer(self) -> BlobWriter:
        return _FileBlobWriter(self)

    def spool_dir(self) -> str | None:
        return str(self.tmp_dir)

    def adopt_blob(self, path: str, digest: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.publish_blob(path, digest)
        except OSError as exc:
            Path(path).unlink(missing_ok=True)
            raise _storage_error("storing a blob", exc) from exc

    def publish_blob(self, path: str, digest: str) -> None:
        """Rename the finished, already durable file at `path` into place as
        the blob `digest` (a writer's commit and `adopt_blob` both end so)."""
        os.chmod(path, 0o644)
        os.replace(path, self.blob_path(digest))
        self.verified(digest)
        self.blob_dir_changed()

    def blob_dir_changed(self) -> None:
        self._unsynced = True

    def sync_blobs(self) -> None:
        # One directory fsync covers every rename before it; a caller that
        # finds another's sync under way waits for it, as it may cover its blobs.
        with self._sync_lock:
            if not self._unsynced:
                return
            self._unsynced = False
            try:
                _fsync_dir(self.blob_dir)
            except OSError as exc:
                self._unsynced = True
                raise _storage_error("syncing blobs", exc) from exc

    def verified(self, digest: str) -> None:
        with self._verified_lock:
            self._verified.add(digest)

    def _check(self, digest: str) -> bool:
        """Whether the stored blob is intact; a corrupt one is deleted."""
        if not self.verify:
            return True
        with self._verified_lock:
            if digest in self._verified:
                return True
        return self._verifying.do(digest, lambda: self._hash_check(digest))

    def _hash_check(self, digest: str) -> bool:
        path = self.blob_path(digest)
        h = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(HASH_CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            return False
        if "sha256:" + h.hexdigest() != digest:
            log.error("deleting blob %s: its content does not match its digest", digest)
            path.unlink(missing_ok=True)
            return False
        self.verified(digest)
        return True

    def locate_blob(self, digest: str) -> BlobLocation | None:
        path = self.blob_path(digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if not self._check(digest):
            return None
        return BlobLocation(size=size, path=str(path))

    def open_blob(self, digest: str) -> BinaryIO | None:
        path = self.blob_path(digest)
        if not path.exists() or not self._check(digest):
            return None
        try:
            return open(path, "rb")
        except FileNotFoundError:
            return None

    # -- documents --------------------------------------------------------

    def _doc_path(self, key: str) -> Path:
        return self.doc_dir / validate_key(key)

    def get_document(self, key: str) -> bytes | None:
        try:
            return self._doc_path(key).read_bytes()
        except FileNotFoundError:
            return None

    def has_document(self, key: str) -> bool:
        return self._doc_path(key).exists()

    def put_document(self, key: str, data: bytes) -> None:
        self._put_document(key, data, durable=True)

    def put_cache_document(self, key: str, data: bytes) -> None:
        self._put_document(key, data, durable=False)

    def _put_document(self, key: str, data: bytes, durable: bool) -> None:
        path = self._doc_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="doc-")
        except OSError as exc:
            raise _storage_error(f"storing {key}", exc) from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise _storage_error(f"storing {key}", exc) from exc
        if durable:
            _fsync_dir(path.parent)

    # -- leases -----------------------------------------------------------

    def leases_exclusive(self) -> bool:
        return True

    def _lease_path(self, key: str) -> Path:
        return self.lease_dir / validate_key(key)

    @contextmanager
    def _lease_guard(self) -> Iterator[None]:
        fd = os.open(self.lease_dir / ".guard", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _lease_file(self, lease: Lease) -> str:
        """A complete temp file holding `lease`, to be linked or renamed into place."""
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="lease-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(json.dumps({**lease.fields(), "token": lease.token}).encode())
        os.chmod(tmp, 0o644)
        return tmp

    def read_lease(self, key: str) -> Lease | None:
        path = self._lease_path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            token = str(json.loads(data)["token"])
        except (ValueError, KeyError, TypeError):
            token = ""
        return parse_lease(key, data, token)

    def acquire_lease(self, key: str, holder: str, ttl: float) -> Lease | None:
        path = self._lease_path(key)
        lease = Lease(key, holder, self.clock() + ttl, secrets.token_hex(8))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._lease_file(lease)
        except OSError as exc:
            raise _storage_error(f"taking the lease {key}", exc) from exc
        try:
            try:
                os.link(tmp, path)  # fails if the name exists: no one else holds it now
                return lease
            except FileExistsError:
                pass
            with self._lease_guard():
                current = self.read_lease(key)
                if current is not None and current.expires > self.clock():
                    return None
                # Free or expired, and no one else can swap it while we hold the guard.
                os.replace(tmp, path)
                return lease
        except OSError as exc:
            raise _storage_error(f"taking the lease {key}", exc) from exc
        finally:
            Path(tmp).unlink(missing_ok=True)

    def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        renewed = Lease(lease.key, lease.holder, self.clock() + ttl, lease.token)
        try:
            tmp = self._lease_file(renewed)
            try:
                with self._lease_guard():
                    current = self.read_lease(lease.key)
                    if current is None or current.token != lease.token:
                        return None
                    os.replace(tmp, self._lease_path(lease.key))
                    return renewed
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as exc:
            raise _storage_error(f"renewing the lease {lease.key}", exc) from exc

    def release_lease(self, lease: Lease) -> None:
        try:
            with self._lease_guard():
                current = self.read_lease(lease.key)
                if current is not None and current.token == lease.token:
                    self._lease_path(lease.key).unlink(missing_ok=True)
        except OSError as exc:
            raise _storage_error(f"releasing the lease {lease.key}", exc) from exc

    # -- use marks and garbage collection ---------------------------------

    def mark_used(self, key: str | None = None, *digests: str) -> None:
        paths = [self._doc_path(key)] if key else []
        paths += [self.blob_path(d) for d in digests]
        now = time.time()
        for path in paths:
            try:
                if path.stat().st_mtime < now - self.mark_interval:
                    os.utime(path)
            except OSError:
                pass  # gone or read-only: gc judges by the old time

    def list_blobs(self) -> Iterator[Entry]:
        for entry in os.scandir(self.blob_dir):
            digest = "sha256:" + entry.name
            try:
                validate_digest(digest)
                st = entry.stat(follow_symlinks=False)
            except (ValueError, FileNotFoundError):
                continue
            yield Entry(digest, st.st_mtime, st.st_size)

    def list_documents(self, prefix: str) -> Iterator[Entry]:
        base = self._doc_path(prefix.rstrip("/"))
        if not base.is_dir():
            return
        for dirpath, _, files in os.walk(base):
            for name in sorted(files):
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                yield Entry(str(path.relative_to(self.doc_dir)), st.st_mtime, st.st_size)

    def delete_blob(self, digest: str) -> None:
        self.blob_path(digest).unlink(missing_ok=True)
        with self._verified_lock:
            self._verified.discard(digest)

    def delete_document(self, key: str) -> None:
        self._doc_path(key).unlink(missing_ok=True)

    def document_mtime(self, key: str) -> float | None:
        try:
            return self._doc_path(key).stat().st_mtime
        except FileNotFoundError:
            return None


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return path.stat().st_mtime < time.time() - seconds
    except FileNotFoundError:
        return False


def _lock_is_free(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
