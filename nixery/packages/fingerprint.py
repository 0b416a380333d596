"""Content fingerprints of local files and directory trees.

A mutable package set or overlay is identified by a digest of its content:
every file's relative path, executable bit and bytes, every symlink's target.
Like git's index, a file is only read again when its stat data changed; the
stat shortcut is trusted only for files last changed well before they were
hashed, because a later write in the same timestamp tick could leave the
stat data unchanged.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time

SKIPPED_DIRS = frozenset({".git"})
# Coarser than any file system timestamp granularity Linux uses.
RACY_NS = 2_000_000_000
CHUNK = 1 << 20

StatKey = tuple[int, int, int, int, int, int]


class Fingerprinter:
    """Digests files and trees, caching file digests by their stat data."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, tuple[StatKey, str]] = {}

    def digest(self, path: str) -> str:
        """sha256 over the content of the file or directory tree at `path`."""
        h = hashlib.sha256()
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            self._tree(path, h)
        else:
            h.update(b"file\0" + self._file(path, st).encode() + _exec_flag(st))
        return h.hexdigest()

    def _tree(self, top: str, h: hashlib._Hash) -> None:
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
            rel_root = os.path.relpath(root, top)
            h.update(b"dir\0" + os.fsencode(rel_root) + b"\0")
            # os.walk lists symlinks to directories under `dirs` without entering them.
            linked = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            for name in sorted([*files, *linked]):
                path = os.path.join(root, name)
                rel = os.fsencode(os.path.join(rel_root, name))
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    h.update(b"link\0" + rel + b"\0" + os.fsencode(os.readlink(path)) + b"\0")
                elif stat.S_ISREG(st.st_mode):
                    entry = self._file(path, st).encode() + _exec_flag(st)
                    h.update(b"file\0" + rel + b"\0" + entry + b"\0")

    def _file(self, path: str, st: os.stat_result) -> str:
        key: StatKey = (
            st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode,
        )  # fmt: skip
        with self._lock:
            cached = self._files.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
            with self._lock:
                self._files[path] = (key, digest)
        return digest


def _exec_flag(st: os.stat_result) -> bytes:
    return b"x" if st.st_mode & 0o111 else b"-"
