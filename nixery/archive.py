"""Reproducible, streamed layer tarballs.

A layer is written in one pass: tar entries go through a tap that hashes the
uncompressed bytes (the diff_id) and compresses them into the sink (a storage
writer, which hashes the compressed bytes into the blob digest). Nothing is
held in memory beyond a compression buffer.

Entries are sorted depth-first by name, owned by 0:0 with empty user and
group names, stamped with mtime 1, and carry no xattrs, so the same input
gives the same bytes on any host. Hard links are written as regular files
(the store only hard-links identical files to save space, and a link target
may live in another layer); sockets, FIFOs and devices cannot be in a Nix
store path and are skipped if present.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from isal import isal_zlib

from nixery.rootfs import RootEntry

MTIME = 1
CHUNK = 1 << 20
DEFAULT_COMPRESSION_LEVEL = 1


class Sink(Protocol):
    def write(self, data: bytes) -> object: ...


@dataclass(frozen=True)
class PackedLayer:
    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    uncompressed_size: int


class _Tap:
    """A write-only file for tarfile that hashes, then gzips into `sink`."""

    def __init__(self, sink: Sink, level: int):
        self._sink = sink
        self._hash = hashlib.sha256()
        self._size = 0
        # wbits 31: a gzip wrapper with a zero mtime and no file name.
        self._zip = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self._size += len(data)
        out = self._zip.compress(data)
        if out:
            self._sink.write(out)
        return len(data)

    def tell(self) -> int:
        return self._size

    def finish(self) -> PackedLayer:
        self._sink.write(self._zip.flush())
        return PackedLayer("sha256:" + self._hash.hexdigest(), self._size)


def _base(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _dir(name: str, mode: int) -> tarfile.TarInfo:
    info = _base(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = _base(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    return info


def _walk(path: str) -> Iterator[tuple[str, os.stat_result]]:
    """Depth-first, name-sorted walk yielding (path, lstat) including `path`."""
    st = os.lstat(path)
    yield path, st
    if stat.S_ISDIR(st.st_mode):
        for name in sorted(os.listdir(path)):
            yield from _walk(os.path.join(path, name))


def _write_store_path(tar: tarfile.TarFile, store_path: str) -> None:
    for path, st in _walk(store_path):
        name = path.lstrip("/")
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            tar.addfile(_dir(name, mode))
        elif stat.S_ISLNK(st.st_mode):
            tar.addfile(_symlink(name, os.readlink(path)))
        elif stat.S_ISREG(st.st_mode):
            info = _base(name)
            info.mode = mode
            info.size = st.st_size
            with open(path, "rb") as fh:
                tar.addfile(info, fh)


def write_store_layer(
    paths: Iterable[str], sink: Sink, level: int = DEFAULT_COMPRESSION_LEVEL
) -> PackedLayer:
    """Write the given store paths (and /nix, /nix/store) as a gzipped tar."""
    tap = _Tap(sink, level)
    with tarfile.open(fileobj=tap, mode="w", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:  # type: ignore[call-overload]
        tar.addfile(_dir("nix", 0o755))
        tar.addfile(_dir("nix/store", 0o755))
        for path in sorted(paths):
            _write_store_path(tar, path)
    return tap.finish()


def write_root_layer(
    entries: Iterable[RootEntry], sink: Sink, level: int = DEFAULT_COMPRESSION_LEVEL
) -> PackedLayer:
    """Write the image's root file system entries (see `rootfs`)."""
    tap = _Tap(sink, level)
    with tarfile.open(fileobj=tap, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for entry in sorted(entries, key=lambda e: e.path.split("/")):
            if entry.kind == "dir":
                tar.addfile(_dir(entry.path, entry.mode))
            elif entry.kind == "symlink":
                tar.addfile(_symlink(entry.path, entry.target))
            else:
                info = _base(entry.path)
                info.mode = entry.mode
                info.size = len(entry.content)
                tar.addfile(info, io.BytesIO(entry.content))
    return tap.finish()
