"""Packing layers: each layer group becomes a tar stored in every configured
compression, on a shared pool of packing threads. With a local storage, a
store layer's tar is written by a worker process (`procpool`), so packing
uses every core; S3 storage packs on the threads, through its blob writers.

A layer is content addressed by its store paths, so it is stored once and
reused by every image that holds the same group; a layer wanted by several
builds at once is packed once, in this process (`SingleFlight`) and across
the replicas sharing the storage (`Leases`): a replica that finds another
packing the layer waits for its record.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from nixery.assembly import archive, procpool
from nixery.assembly.archive import Output, PackedLayer
from nixery.assembly.layers import LayerGroup
from nixery.assembly.rootfs import ImageUser, root_entries
from nixery.images.activity import BuildEvents
from nixery.images.model import FORMAT_VERSION, Blob, BuildSettings, Layer, cache_key
from nixery.leases import Leases
from nixery.packages.nix import ResolvedPackage
from nixery.singleflight import SingleFlight
from nixery.storage import BlobWriter, Storage


@dataclass(frozen=True)
class LayerResult:
    """One layer of a build, and whether this build packed it."""

    layer: Layer
    packed_bytes: int | None  # None: reused from the cache
    store_io: float


class _Packed(NamedTuple):
    """A layer's tar and its stored blobs (gzip first), with the storage seconds."""

    tar: PackedLayer
    blobs: list[Blob]
    store_io: float


class _TimedSink:
    """A storage writer that counts the time spent inside it."""

    def __init__(self, writer: BlobWriter):
        self.writer = writer
        self.seconds = 0.0

    def write(self, data: bytes) -> None:
        started = time.perf_counter()
        self.writer.write(data)
        self.seconds += time.perf_counter() - started

    def commit(self) -> str:
        started = time.perf_counter()
        digest = self.writer.commit()
        self.seconds += time.perf_counter() - started
        return digest


class LayerPacker:
    """Stores the layers of images, reusing those already stored."""

    def __init__(
        self, storage: Storage, settings: BuildSettings, events: BuildEvents, leases: Leases
    ):
        self.storage = storage
        self.leases = leases
        self.settings = settings
        self.events = events
        self._layer_flight: SingleFlight[LayerResult] = SingleFlight()
        self._packers = ThreadPoolExecutor(settings.pack_workers, thread_name_prefix="nixery-pack")
        self._lock = threading.Lock()
        self.layers_packed = 0  # observable by tests and metrics

    def pack(
        self,
        groups: Sequence[LayerGroup],
        packages: Sequence[ResolvedPackage],
        on_done: Callable[[], None],
        user: ImageUser | None = None,
    ) -> list[LayerResult]:
        """One layer per group, then the root layer (which comes on top)."""
        jobs: list[Callable[[], LayerResult]] = [
            functools.partial(self._store_layer, group) for group in groups
        ]
        jobs.append(functools.partial(self._root_layer, packages, user))
        sizes = [g.size for g in groups] + [0]
        return self._run_packers(jobs, sizes, on_done)

    def _run_packers(
        self,
        jobs: Sequence[Callable[[], LayerResult]],
        sizes: Sequence[int],
        on_done: Callable[[], None],
    ) -> list[LayerResult]:
        """Run the layer jobs on the shared packing pool, biggest first so that
        the longest job does not start last; results keep the jobs' order.
        `on_done` is called on this thread as each job finishes."""
        order = sorted(range(len(jobs)), key=lambda i: -sizes[i])
        futures: dict[Future[LayerResult], int] = {}
        try:
            for i in order:
                # Each job carries this build's log context (its request id).
                run = contextvars.copy_context().run
                futures[self._packers.submit(run, jobs[i])] = i
            results: dict[int, LayerResult] = {}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                on_done()
            return [results[i] for i in range(len(jobs))]
        finally:
            for future in futures:
                future.cancel()  # after a failure: skip what has not started

    def _store_layer(self, group: LayerGroup) -> LayerResult:
        key = f"layers/{cache_key(FORMAT_VERSION, group.paths, self.settings.encoding())}.json"
        return self._cached_layer(key, group.paths, lambda: self._pack_store(group.paths))

    def _root_layer(
        self, packages: Sequence[ResolvedPackage], user: ImageUser | None
    ) -> LayerResult:
        pairs = sorted((p.attr_path, p.out) for p in packages)
        # A root layer without a user keeps the key it always had.
        parts: list[object] = [FORMAT_VERSION, "root", pairs, self.settings.encoding()]
        if user is not None:
            parts.append(["user", user.name, user.uid, user.gid, user.home])
        key = f"layers/{cache_key(*parts)}.json"
        return self._cached_layer(
            key,
            (),
            lambda: self._pack_here(
                lambda outputs: archive.write_root_layer(root_entries(pairs, user), outputs)
            ),
        )

    def _cached_layer(
        self, key: str, paths: tuple[str, ...], pack: Callable[[], _Packed]
    ) -> LayerResult:
        """Reuse the layer stored under `key`, or pack it with `pack`; a layer
        wanted by several builds at once is packed once."""
        cached = self._stored_layer(key)
        self.events.cache_lookup("layer", cached is not None)
        if cached is not None:
            # Reused by a build in progress: gc must not take it now.
            zstd = [cached.zstd.digest] if cached.zstd else []
            self.storage.mark_used(key, cached.digest, *zstd)
            return LayerResult(cached, None, 0.0)
        return self._layer_flight.do(
            key,
            lambda: self.leases.run_once(
                key.removesuffix(".json"),
                lambda: self._reused_layer(key),
                lambda: self._pack_layer(key, paths, pack),
                on_wait=lambda: self.events.lease_waited("layer"),
            ),
        )

    def _reused_layer(self, key: str) -> LayerResult | None:
        """The layer stored meanwhile (by another flight or replica), if any."""
        cached = self._stored_layer(key)
        return None if cached is None else LayerResult(cached, None, 0.0)

    def _stored_layer(self, key: str) -> Layer | None:
        cached = self.storage.get_document(key)
        if cached is None:
            return None
        try:
            layer = Layer.from_json(json.loads(cached))
        except (ValueError, KeyError, TypeError):
            return None
        blobs = [layer.digest] + ([layer.zstd.digest] if layer.zstd else [])
        if any(self.storage.locate_blob(d) is None for d in blobs):
            return None
        return layer

    def _pack_here(self, write: Callable[[list[Output]], PackedLayer]) -> _Packed:
        """Pack on this thread, through the storage's blob writers."""
        compressions = self.settings.outputs()
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(self.storage.blob_writer()) for _ in compressions]
            sinks = [_TimedSink(w) for w in writers]
            packed = write([Output(c, s) for c, s in zip(compressions, sinks, strict=True)])
            blobs = [Blob(sink.commit(), sink.writer.size) for sink in sinks]
        return _Packed(packed, blobs, sum(s.seconds for s in sinks))

    def _pack_store(self, paths: tuple[str, ...]) -> _Packed:
        """A store layer: with local storage in a worker process, where the
        tar's Python work does not share this process's GIL; on this thread
        for S3, or when worker processes are unavailable."""
        spool = self.storage.spool_dir()
        if spool is not None:
            try:
                packed, spooled = procpool.pack_store_layer(paths, self.settings.outputs(), spool)
            except procpool.PoolUnavailable:  # logged by procpool, once per failure
                pass
            else:
                return self._publish(packed, spooled)
        return self._pack_here(lambda outputs: archive.write_store_layer(paths, outputs))

    def _publish(self, packed: PackedLayer, spooled: list[procpool.SpooledBlob]) -> _Packed:
        """Make a worker's blobs durable and visible in the storage."""
        started = time.perf_counter()
        try:
            for blob in spooled:
                self.storage.adopt_blob(blob.path, blob.digest)
        finally:
            for blob in spooled:  # those not published after a failure
                Path(blob.path).unlink(missing_ok=True)
        blobs = [Blob(b.digest, b.size) for b in spooled]
        return _Packed(packed, blobs, time.perf_counter() - started)

    def _pack_layer(
        self, key: str, paths: tuple[str, ...], pack: Callable[[], _Packed]
    ) -> LayerResult:
        packed, blobs, store_io = pack()
        gzip, zstd = blobs[0], (blobs[1] if len(blobs) > 1 else None)
        layer = Layer(gzip.digest, gzip.size, packed.diff_id, paths, zstd)
        started = time.perf_counter()
        # A record lost to a power cut only costs packing again (see storage).
        self.storage.put_cache_document(key, json.dumps(layer.to_json()).encode())
        store_io += time.perf_counter() - started
        with self._lock:
            self.layers_packed += 1
        return LayerResult(layer, packed.uncompressed_size, store_io)
