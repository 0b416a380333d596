"""Blobs and documents in a local directory.

Layout: `blobs/sha256/<hex>`, `documents/<key>`, `tmp/` for writes in
progress. Every write goes to a temp file in the same file system, is
fsynced, then renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from nixery.storage.base import (
    BlobLocation,
    BlobWriter,
    Storage,
    StorageError,
    validate_digest,
    validate_key,
)


class _FileBlobWriter(BlobWriter):
    def __init__(self, storage: FilesystemStorage):
        super().__init__()
        self._storage = storage
        fd, name = tempfile.mkstemp(dir=storage.tmp_dir, prefix="blob-")
        self._tmp: str | None = name
        self._fh = os.fdopen(fd, "wb")

    def _write(self, data: bytes) -> None:
        try:
            self._fh.write(data)
        except OSError as exc:
            self.abort()
            raise StorageError(f"writing blob failed: {exc}") from exc

    def _commit(self, digest: str) -> None:
        assert self._tmp is not None, "blob writer already finished"
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.chmod(self._tmp, 0o644)
            os.replace(self._tmp, self._storage.blob_path(digest))
            self._tmp = None
            _fsync_dir(self._storage.blob_dir)
        except OSError as exc:
            self.abort()
            raise StorageError(f"storing blob failed: {exc}") from exc

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
            self._tmp = None


class FilesystemStorage(Storage):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / "sha256"
        self.doc_dir = self.root / "documents"
        self.tmp_dir = self.root / "tmp"
        for d in (self.blob_dir, self.doc_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / validate_digest(digest)

    def blob_writer(self) -> BlobWriter:
        return _FileBlobWriter(self)

    def locate_blob(self, digest: str) -> BlobLocation | None:
        path = self.blob_path(digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return BlobLocation(size=size, path=str(path))

    def open_blob(self, digest: str) -> BinaryIO | None:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            return None

    def _doc_path(self, key: str) -> Path:
        return self.doc_dir / validate_key(key)

    def get_document(self, key: str) -> bytes | None:
        try:
            return self._doc_path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put_document(self, key: str, data: bytes) -> None:
        path = self._doc_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="doc-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"storing {key} failed: {exc}") from exc
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
