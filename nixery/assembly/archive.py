"""Reproducible, streamed layer tarballs.

A layer is written in one pass: tar entries go through a tap that cuts the
uncompressed stream into fixed-size chunks and hashes them (the diff_id).
Each chunk is then compressed by one encoder per requested compression
(gzip, optionally zstd as well), each writing into its own sink (a storage
writer, which hashes the compressed bytes into the blob digest). Encoders
run on their own threads, so reading and hashing overlap with compressing;
the compressors and hashes release the GIL. Memory is bounded by a few
chunks per encoder, whatever the layer's size.

Compressors always see the same chunk sequence, so the bytes do not depend
on threading. Entries are sorted depth-first by name, owned by 0:0 (only
a `nonroot` image's home is owned by its fixed user) with
empty user and group names, stamped with mtime 1, and carry no xattrs, so
the same input gives the same bytes on any host. Hard links are written as
regular files (the store only hard-links identical files to save space, and
a link target may live in another layer); sockets, FIFOs and devices cannot
be in a Nix store path and are skipped if present.
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import zstandard
from isal import isal_zlib

from nixery.assembly import tar
from nixery.assembly.rootfs import RootEntry
from nixery.errors import NixeryError

MTIME = 1
CHUNK = 1 << 20
QUEUED_CHUNKS = 4  # per encoder thread: bounds memory, absorbs jitter
DEFAULT_COMPRESSION_LEVEL = 1
DEFAULT_ZSTD_LEVEL = 3
GZIP = "gzip"
ZSTD = "zstd"


class ArchiveError(NixeryError):
    """A store path changed while it was being packed."""


class Sink(Protocol):
    def write(self, data: bytes) -> object: ...


class _Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


@dataclass(frozen=True)
class Compression:
    """One compressed encoding of a layer: `gzip` (ISA-L) or `zstd`."""

    codec: str
    level: int

    def __post_init__(self) -> None:
        if self.codec not in (GZIP, ZSTD):
            raise ValueError(f"unknown compression {self.codec!r}")

    def compressor(self) -> _Compressor:
        if self.codec == GZIP:
            # wbits 31: a gzip wrapper with a zero mtime and no file name.
            return isal_zlib.compressobj(self.level, isal_zlib.DEFLATED, 31)
        # Single-threaded zstd, no content size in the frame: the frame depends
        # only on the input bytes.
        return zstandard.ZstdCompressor(level=self.level).compressobj()


GZIP_DEFAULT = Compression(GZIP, DEFAULT_COMPRESSION_LEVEL)


@dataclass(frozen=True)
class Output:
    compression: Compression
    sink: Sink


@dataclass(frozen=True)
class PackedLayer:
    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    uncompressed_size: int


class _Encoder:
    """Compresses chunks into one sink, inline or on its own thread."""

    _DONE = b""

    def __init__(self, output: Output, threaded: bool):
        self._zip = output.compression.compressor()
        self._sink = output.sink
        self._error: BaseException | None = None
        self._queue: queue.Queue[bytes] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.Queue(QUEUED_CHUNKS)
            self._thread = threading.Thread(target=self._drain, name="nixery-encoder", daemon=True)
            self._thread.start()

    def _encode(self, chunk: bytes) -> None:
        out = self._zip.compress(chunk)
        if out:
            self._sink.write(out)

    def _drain(self) -> None:
        assert self._queue is not None
        while (chunk := self._queue.get()) is not self._DONE:
            if self._error is None:
                try:
                    self._encode(chunk)
                except BaseException as exc:  # reported to the producer
                    self._error = exc
        if self._error is None:
            try:
                self._sink.write(self._zip.flush())
            except BaseException as exc:
                self._error = exc

    def put(self, chunk: bytes) -> None:
        if self._queue is None:
            self._encode(chunk)
            return
        self._raise()
        self._queue.put(chunk)

    def close(self) -> None:
        """Flush and wait for the thread; raise what went wrong in it."""
        if self._queue is None:
            self._sink.write(self._zip.flush())
            return
        self._stop()
        self._raise()

    def _stop(self) -> None:
        if self._thread is not None:
            assert self._queue is not None
            self._queue.put(self._DONE)
            self._thread.join()
            self._thread = None

    def abandon(self) -> None:
        """Stop the thread after a failure elsewhere; the sink is discarded."""
        self._error = self._error or RuntimeError("layer abandoned")
        self._stop()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class _Tap:
    """The tar stream's sink: fixed-size chunks, hashed, then encoded."""

    def __init__(self, outputs: Sequence[Output], threaded: bool):
        if not outputs:
            raise ValueError("a layer needs at least one output")
        self._hash = hashlib.sha256()
        self._size = 0
        self._buf = bytearray(CHUNK)
        self._view = memoryview(self._buf)
        self._fill = 0
        self._encoders: list[_Encoder] = []
        try:
            for output in outputs:
                self._encoders.append(_Encoder(output, threaded))
        except BaseException:
            self.abandon()
            raise

    def write(self, data: bytes) -> int:
        size = len(data)
        view = memoryview(data)
        done = 0
        while done < size:
            n = min(CHUNK - self._fill, size - done)
            self._view[self._fill : self._fill + n] = view[done : done + n]
            self._fill += n
            done += n
            if self._fill == CHUNK:
                self._emit(bytes(self._buf))
                self._fill = 0
        self._size += size
        return size

    def copy_from(self, fd: int, size: int, name: bytes) -> None:
        """Append exactly `size` bytes of the file `fd`, read straight into the chunk."""
        left = size
        view, readv = self._view, os.readv
        while left:
            n = readv(fd, [view[self._fill : self._fill + min(left, CHUNK - self._fill)]])
            if not n:
                raise ArchiveError(f"{name!r} is shorter than its {size} bytes")
            self._fill += n
            left -= n
            if self._fill == CHUNK:
                self._emit(bytes(self._buf))
                self._fill = 0
        self._size += size

    def _emit(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        for encoder in self._encoders:
            encoder.put(chunk)

    def tell(self) -> int:
        return self._size

    def finish(self) -> PackedLayer:
        try:
            if self._fill:  # an encoder may fail on this last chunk too
                self._emit(bytes(self._view[: self._fill]))
                self._fill = 0
            for encoder in self._encoders:
                encoder.close()
        except BaseException:
            self.abandon()
            raise
        return PackedLayer("sha256:" + self._hash.hexdigest(), self._size)

    def abandon(self) -> None:
        for encoder in self._encoders:
            encoder.abandon()


def _walk(path: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    """Depth-first, name-sorted walk yielding (path, lstat) including `path`."""
    # A stack rather than nested generators: each entry then costs one step,
    # not one per directory level.
    stack = [path]
    while stack:
        path = stack.pop()
        st = os.lstat(path)
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            stack.extend(path + b"/" + name for name in sorted(os.listdir(path), reverse=True))


class _TarStream:
    """Tar members into the tap (see `tar` for the format)."""

    def __init__(self, tap: _Tap):
        self._tap = tap

    def directory(self, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
        self._tap.write(tar.header(name, tar.DIRECTORY, mode, MTIME, uid=uid, gid=gid))

    def symlink(self, name: bytes, target: bytes) -> None:
        self._tap.write(tar.header(name, tar.SYMLINK, 0o777, MTIME, link=target))

    def file(self, name: bytes, mode: int, size: int, path: bytes) -> None:
        self._tap.write(tar.header(name, tar.REGULAR, mode, MTIME, size=size))
        if size:
            # A bare descriptor: thousands of small files make file objects count.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._tap.copy_from(fd, size, path)
            finally:
                os.close(fd)
            if size % tar.BLOCK:
                self._tap.write(tar.padding(size))

    def content(self, name: bytes, mode: int, data: bytes) -> None:
        self._tap.write(tar.header(name, tar.REGULAR, mode, MTIME, size=len(data)))
        self._tap.write(data + tar.padding(len(data)))

    def close(self) -> None:
        self._tap.write(tar.end(self._tap.tell()))


def _write_store_path(out: _TarStream, store_path: bytes) -> None:
    for path, st in _walk(store_path):
        name = path.lstrip(b"/")
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            out.directory(name, mode)
        elif stat.S_ISLNK(st.st_mode):
            out.symlink(name, os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            out.file(name, mode, st.st_size, path)


def write_store_layer(
    paths: Iterable[str], outputs: Sequence[Output], *, threaded: bool = True
) -> PackedLayer:
    """Write the given store paths (and /nix, /nix/store) as a compressed tar
    into every output; all outputs share one tar stream and diff_id."""
    tap = _Tap(outputs, threaded)
    try:
        out = _TarStream(tap)
        out.directory(b"nix", 0o755)
        out.directory(b"nix/store", 0o755)
        for path in sorted(os.fsencode(p) for p in paths):
            _write_store_path(out, path)
        out.close()
    except BaseException:
        tap.abandon()
        raise
    return tap.finish()


def write_root_layer(
    entries: Iterable[RootEntry], outputs: Sequence[Output], *, threaded: bool = False
) -> PackedLayer:
    """Write the image's root file system entries (see `rootfs`)."""
    tap = _Tap(outputs, threaded)
    try:
        out = _TarStream(tap)
        for entry in sorted(entries, key=lambda e: e.path.split("/")):
            name = os.fsencode(entry.path)
            if entry.kind == "dir":
                out.directory(name, entry.mode, entry.uid, entry.gid)
            elif entry.kind == "symlink":
                out.symlink(name, os.fsencode(entry.target))
            else:
                out.content(name, entry.mode, entry.content)
        out.close()
    except BaseException:
        tap.abandon()
        raise
    return tap.finish()
