"""Packing store layers in worker processes.

The tar stream's per-file work (lstat, open, headers) is Python and holds the
GIL, so packing threads in one process use little more than one core. A
store layer is therefore packed by a worker process: it streams the tar
through the compressors and hashes into temporary files in a directory the
caller names, and returns the digests; the caller makes them durable and
publishes them (see `storage`). The bytes are those of `write_store_layer`
in this process.

The pool is shared by the whole process, started at its first use and sized
to the cores. Workers are forked from a fork server (a fresh process that
has imported this module and, as multiprocessing does, the program's main
script), never from the server itself, which has threads; they exit with
the server, however it ends. When workers cannot be started (e.g. a
sandbox that forbids what they need) or one dies, the caller gets
`PoolUnavailable` and packs on its own thread; processes are tried again
after `RETRY_AFTER` seconds.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from nixery.assembly.archive import Compression, Output, PackedLayer, write_store_layer
from nixery.packages.platforms import host_cores
from nixery.storage.filesystem import SpoolFile

log = logging.getLogger(__name__)

RETRY_AFTER = 60.0  # seconds without worker processes after they failed


class PoolUnavailable(Exception):
    """The worker processes could not be started, or one died."""


@dataclass(frozen=True)
class SpooledBlob:
    """A compressed layer written by a worker, not yet durable nor published."""

    path: str
    digest: str
    size: int


def _pack(
    paths: tuple[str, ...], compressions: tuple[Compression, ...], directory: str
) -> tuple[PackedLayer, list[SpooledBlob]]:
    """In a worker: the layer of `paths`, one temporary file per compression."""
    sinks: list[SpoolFile] = []
    try:
        for _ in compressions:
            sinks.append(SpoolFile(directory))
        outputs = [Output(c, s) for c, s in zip(compressions, sinks, strict=True)]
        packed = write_store_layer(paths, outputs)
        return packed, [SpooledBlob(s.path, s.finish(), s.size) for s in sinks]
    except BaseException:
        for sink in sinks:
            sink.discard()
        raise


def _watch(server: int) -> None:
    """Runs first in each worker: exit when the server process ends. A worker
    waits for work on a pipe it also holds the writing end of, so otherwise
    it would outlive a server killed with `kill -9`, waiting forever."""
    try:
        pidfd: int | None = os.pidfd_open(server)
    except ProcessLookupError:
        os._exit(1)
    except OSError:  # no pidfd here (an old kernel, a system call filter): poll
        pidfd = None

    def wait() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the process has ended
        else:
            while _exists(server):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=wait, name="nixery-server-watch", daemon=True).start()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_failed_at: float | None = None  # when workers last failed


def _executor() -> ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            context = multiprocessing.get_context("forkserver")
            # Workers fork from a fresh single-threaded process that has
            # imported this module, not from this process and its threads.
            context.set_forkserver_preload([__name__])
            _pool = ProcessPoolExecutor(
                max_workers=host_cores(),
                mp_context=context,
                initializer=_watch,
                initargs=(os.getpid(),),
            )
        return _pool


def _forget(broken: ProcessPoolExecutor | None, reason: str) -> None:
    global _pool, _failed_at
    with _lock:
        first = _pool is broken  # other threads may have met the same failure
        if first:
            _pool = None
        _failed_at = time.monotonic()
    if first:
        log.warning("packing layers on threads for %.0f s: %s", RETRY_AFTER, reason)
    if broken is not None:
        broken.shutdown(wait=False, cancel_futures=True)


def _failed_recently() -> bool:
    with _lock:
        return _failed_at is not None and time.monotonic() - _failed_at < RETRY_AFTER


def pack_store_layer(
    paths: Sequence[str], compressions: Sequence[Compression], directory: str
) -> tuple[PackedLayer, list[SpooledBlob]]:
    """Pack the layer of `paths` in a worker process, into files in `directory`
    (one per compression, in their order); blocks until it is done. The caller
    owns the files: it publishes or removes them. Raises `PoolUnavailable`
    when no worker can do it; errors of the packing itself pass through."""
    if _failed_recently():
        raise PoolUnavailable("worker processes failed less than a minute ago")
    pool = None
    try:
        pool = _executor()
        future = pool.submit(_pack, tuple(paths), tuple(compressions), directory)
    except (OSError, EOFError, RuntimeError) as exc:  # processes cannot start here
        reason = f"cannot start worker processes: {exc}"
        _forget(pool, reason)
        raise PoolUnavailable(reason) from exc
    try:
        return future.result()
    except BrokenProcessPool as exc:
        reason = f"a worker process ended: {exc}"
        _forget(pool, reason)
        raise PoolUnavailable(reason) from exc


def shutdown() -> None:
    """Stop the workers (they finish the layer in hand); a later use starts new ones."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown)
