"""The orchestrator: from a requested image to stored manifests.

It composes the pure steps (name -> packages -> closure graph -> layers ->
archives -> manifests) with the two modules that touch the outside world:
`nix` and `storage`. Everything it writes is content addressed, and the
small documents that index blobs are written last, so a crash at any point
leaves nothing that points at a missing blob.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from nixery.assembly import archive
from nixery.assembly.archive import Compression, Output, PackedLayer
from nixery.assembly.layers import DEFAULT_BUDGET, LAYERING_VERSION, LayerGroup, group_layers
from nixery.assembly.manifest import (
    OCI_LAYER_ZSTD,
    Descriptor,
    Document,
    Format,
    Negotiated,
    config_document,
    image_config,
    index_document,
    manifest_document,
    media_type_of,
    referenced_digests,
)
from nixery.assembly.rootfs import root_entries
from nixery.errors import (
    BuildFailed,
    BuildNotAllowed,
    ErrorCode,
    NixeryError,
    QueueFull,
    RegistryError,
    UnknownPackages,
)
from nixery.images.activity import FAILURE, SUCCESS, UNKNOWN_PACKAGES, Build, BuildEvents
from nixery.packages.catalog import Catalog, Lookup
from nixery.packages.graph import ClosureGraph, store_path_name
from nixery.packages.names import (
    ALWAYS_INCLUDED,
    ImageRequest,
    image_component,
    is_digest,
    is_sha256,
    parse_image_name,
    validate_digest,
    validate_tag,
)
from nixery.packages.nix import Nix, ResolvedPackage, temporary_roots
from nixery.packages.platforms import Platform, host_cores, host_platform
from nixery.packages.popularity import Counts, PopularityByRevision
from nixery.packages.sources import LATEST, ResolvedSource, Sources
from nixery.singleflight import SingleFlight
from nixery.storage import BlobWriter, Storage

log = logging.getLogger(__name__)

# Bump when the bytes of layers or manifests change for the same input.
FORMAT_VERSION = "2"
# Larger blobs are never read as manifests (the spec's suggested manifest limit).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
DEFAULT_MAX_QUEUE = 16
# Requests that may wait for builds at once: each holds a server thread.
DEFAULT_MAX_WAITING = 48
DEFAULT_RETRY_AFTER = 5  # seconds, before any build has been timed


@dataclass(frozen=True)
class BuildSettings:
    layer_budget: int = DEFAULT_BUDGET
    compression_level: int = archive.DEFAULT_COMPRESSION_LEVEL
    platforms: tuple[Platform, ...] = field(default_factory=lambda: (host_platform(),))
    overlays: tuple[str, ...] = ()
    max_packages: int = 64
    max_image_size: int | None = None  # closure NAR bytes
    # "gzip", or "zstd": OCI manifests then reference zstd layers, Docker
    # manifests gzip ones (Docker schema2 has no zstd); both share diff_ids.
    compression: str = archive.GZIP
    zstd_level: int = archive.DEFAULT_ZSTD_LEVEL
    # Layers packed at once: twice the cores, so that a worker waiting for
    # fsync leaves its core to another.
    pack_workers: int = field(default_factory=lambda: 2 * host_cores())
    max_builds: int = field(default_factory=host_cores)  # images built at once
    max_queue: int = DEFAULT_MAX_QUEUE  # more images waiting for a build slot
    max_waiting: int = DEFAULT_MAX_WAITING  # requests waiting for builds at once

    def outputs(self) -> tuple[Compression, ...]:
        """The encodings every layer is stored in; gzip always comes first."""
        gzip = Compression(archive.GZIP, self.compression_level)
        if self.compression == archive.ZSTD:
            return (gzip, Compression(archive.ZSTD, self.zstd_level))
        return (gzip,)


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@dataclass(frozen=True)
class Layer:
    digest: str  # the gzip blob, which every client can read
    size: int
    diff_id: str
    paths: tuple[str, ...]
    zstd: Blob | None = None  # the same tar, zstd-compressed

    def descriptor(self, fmt: Format) -> Descriptor:
        if self.zstd is not None and fmt is Format.OCI:
            return Descriptor(OCI_LAYER_ZSTD, self.zstd.digest, self.zstd.size)
        return Descriptor(fmt.layer_type, self.digest, self.size)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "digest": self.digest,
            "size": self.size,
            "diff_id": self.diff_id,
            "paths": list(self.paths),
        }
        if self.zstd is not None:
            out["zstd"] = asdict(self.zstd)
        return out

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Layer:
        zstd = Blob(data["zstd"]["digest"], data["zstd"]["size"]) if "zstd" in data else None
        return Layer(data["digest"], data["size"], data["diff_id"], tuple(data["paths"]), zstd)


@dataclass(frozen=True)
class BuiltImage:
    """One platform's image: its manifests in both formats and its layers."""

    manifests: Mapping[str, Descriptor]  # Format name -> manifest descriptor
    layers: tuple[Layer, ...]
    packages: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "manifests": {k: d.to_json() for k, d in self.manifests.items()},
            "layers": [layer.to_json() for layer in self.layers],
            "packages": list(self.packages),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> BuiltImage:
        manifests = {
            k: Descriptor(d["mediaType"], d["digest"], d["size"])
            for k, d in data["manifests"].items()
        }
        layers = tuple(Layer.from_json(layer) for layer in data["layers"])
        return BuiltImage(manifests, layers, tuple(data["packages"]))


@dataclass(frozen=True)
class BuildProfile:
    """Where a build's time went, in seconds of wall-clock time, and what it packed.

    `store_io` is the time spent inside storage writes and commits while
    packing, summed over the packing threads (so it can exceed `packing`,
    which includes it)."""

    evaluate: float = 0.0  # resolving the names in the package set
    realise: float = 0.0  # building or substituting the packages
    closure: float = 0.0  # reading the closure graph and grouping layers
    packing: float = 0.0  # packing and storing every layer
    store_io: float = 0.0
    documents: float = 0.0  # configs, manifests and the image record
    total: float = 0.0
    packed_bytes: int = 0  # uncompressed tar bytes of the layers packed

    @property
    def nix(self) -> float:
        return self.evaluate + self.realise + self.closure

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_json(data: Mapping[str, float]) -> BuildProfile:
        seconds = {f: float(data.get(f, 0.0)) for f in _PROFILE_SECONDS}
        return BuildProfile(**seconds, packed_bytes=int(data.get("packed_bytes", 0)))


_PROFILE_SECONDS = ("evaluate", "realise", "closure", "packing", "store_io", "documents", "total")


@dataclass(frozen=True)
class _LayerResult:
    layer: Layer
    packed_bytes: int | None  # None: reused from the cache
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


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class ImageService:
    """Answers manifest requests, building images on demand."""

    def __init__(
        self,
        storage: Storage,
        nix: Nix,
        sources: Sources,
        settings: BuildSettings,
        popularity: Mapping[str, int] | PopularityByRevision | None = None,
        events: BuildEvents | None = None,
    ):
        self.storage = storage
        self.nix = nix
        self.sources = sources
        self.settings = settings
        # Fixed data, or data fetched for each package set revision.
        self.by_revision: PopularityByRevision | None = None
        fixed: Mapping[str, int] = {}
        if isinstance(popularity, PopularityByRevision):
            self.by_revision = popularity
        elif popularity is not None:
            fixed = popularity
        self.fixed_popularity = Counts.of(fixed)
        self.events = events or BuildEvents()
        self.catalog = Catalog(nix, settings.overlays)
        # Builds run on their own workers: a client that leaves cancels nothing.
        self._flight: SingleFlight[BuiltImage] = SingleFlight(
            settings.max_builds, settings.max_queue, "nixery-build"
        )
        self._layer_flight: SingleFlight[_LayerResult] = SingleFlight()
        self._packers = ThreadPoolExecutor(settings.pack_workers, thread_name_prefix="nixery-pack")
        self._lock = threading.Lock()
        self._durations: deque[float] = deque(maxlen=16)
        self.layers_packed = 0  # observable by tests and metrics
        self._asking = _Count()  # requests inside a (possibly shared) build
        self._building = _Count()  # builds running

    # -- requests -------------------------------------------------------

    def manifest(
        self, name: str, reference: str, accept: Negotiated, may_build: bool = True
    ) -> Document:
        """The manifest for `reference`; `may_build=False` serves only cached images."""
        request = parse_image_name(name, self.settings.max_packages)
        if is_digest(reference):
            validate_digest(reference)
            document = self._stored_manifest(reference)
            # An image pinned by digest is in use too: gc reads the marks of
            # its manifests, as it reads its document's for pulls by tag.
            listed = referenced_digests(document.data) if document.is_index else []
            self.storage.mark_used(None, reference, *listed)
            return document
        validate_tag(reference)
        source = self.sources.resolve(reference)
        platforms = (request.platform,) if request.platform else self.settings.platforms
        if accept.index_format is not None and len(platforms) > 1:
            # Every platform's build is queued at once, so they run side by side.
            futures = [
                self._image_future(request, source, p, name, reference, may_build)
                for p in platforms
            ]
            images = list(zip(platforms, self._wait(futures), strict=True))
            return self._index(images, accept.index_format)
        # Without a list the client gets the first configured platform; only it is built.
        image = self.image(request, source, platforms[0], name, reference, may_build)
        return self._stored_manifest(image.manifests[accept.formats[0].name].digest)

    def tags(self, name: str) -> list[str]:
        """The tags `name` can be pulled with, in ASCII order."""
        parse_image_name(name, self.settings.max_packages)
        return sorted(set(self.sources.tags()))

    def manifest_by_digest(self, digest: str) -> Document | None:
        """A stored manifest or index; None for anything else, including other blobs."""
        if not is_sha256(digest):
            return None  # only sha256 is ever stored
        location = self.storage.locate_blob(digest)
        if location is None or location.size > MAX_MANIFEST_SIZE:
            return None
        data = self.storage.read_blob(digest)
        if data is None:
            return None
        media_type = media_type_of(data)
        return Document(media_type, data) if media_type else None

    def _stored_manifest(self, digest: str) -> Document:
        document = self.manifest_by_digest(digest)
        if document is None:
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"digest": digest})
        return document

    def _index(self, images: Sequence[tuple[Platform, BuiltImage]], fmt: Format) -> Document:
        """The list of per-platform manifests in `fmt`.

        Both dialects are stored before either is served, so any list digest a
        client has seen stays fetchable by digest, also after a restart.
        """
        documents = {
            f: index_document(f, [(p, image.manifests[f.name]) for p, image in images])
            for f in Format
        }
        for document in documents.values():
            if self.storage.locate_blob(document.digest) is None:
                self.storage.put_blob(document.data)
        return documents[fmt]

    # -- building -------------------------------------------------------

    def image(
        self,
        request: ImageRequest,
        source: ResolvedSource,
        platform: Platform,
        name: str | None = None,
        tag: str = LATEST,
        may_build: bool = True,
    ) -> BuiltImage:
        """The built image for one platform, from cache or from Nix.

        `name` and `tag` are as asked; they label the build for people.
        Without `may_build`, only a stored image is returned."""
        future = self._image_future(request, source, platform, name, tag, may_build)
        return self._wait([future])[0]

    def _wait(self, futures: Sequence[Future[BuiltImage]]) -> list[BuiltImage]:
        if all(f.done() for f in futures):
            return [f.result() for f in futures]
        # A waiting request holds a server thread; past the limit it is
        # refused, so threads stay free for cached images, blobs and health
        # checks. Its build goes on, and the retry finds the image stored.
        if not self._asking.enter(self.settings.max_waiting):
            raise RegistryError(
                ErrorCode.TOOMANYREQUESTS,
                {"waiting": self.settings.max_waiting},
                "too many requests are waiting for builds, retry later",
                headers={"Retry-After": str(self._retry_after())},
            )
        try:
            return [f.result() for f in futures]
        finally:
            self._asking.leave()

    def _image_future(
        self,
        request: ImageRequest,
        source: ResolvedSource,
        platform: Platform,
        name: str | None,
        tag: str,
        may_build: bool = True,
    ) -> Future[BuiltImage]:
        popularity = self.popularity_for(source)
        # The layering's version too: the same inputs laid out by another
        # version of group_layers are another image.
        key = _key(
            FORMAT_VERSION, LAYERING_VERSION, source.revision, request.packages,
            platform.nix_system, self.settings.overlays, self.settings.layer_budget,
            self._encoding(), popularity.digest,
        )  # fmt: skip
        doc_key = f"images/{key}.json"
        # The revision pins the package set, so a stored image is never stale.
        cached = self._stored_image(doc_key)
        self.events.cache_lookup("image", cached is not None)
        if cached is not None:
            done: Future[BuiltImage] = Future()
            done.set_result(cached)
            return done
        if not may_build:
            raise BuildNotAllowed()
        label = name or "/".join(request.requested) or "/".join(request.packages)
        try:
            future = self._flight.submit(
                key,
                lambda: (
                    self._stored_image(doc_key)
                    or self._build(request, source, platform, doc_key, label, tag, popularity)
                ),
            )
        except QueueFull as exc:
            raise RegistryError(
                ErrorCode.TOOMANYREQUESTS,
                {"building": exc.running, "waiting": exc.waiting},
                "too many images are being built, retry later",
                headers={"Retry-After": str(self._retry_after())},
            ) from exc
        building, waiting = self._flight.counts()
        if waiting and building >= self.settings.max_builds:
            log.info("build queue: %d building, %d waiting", building, waiting)
        return future

    def popularity_for(self, source: ResolvedSource) -> Counts:
        """The popularity data images of `source` are laid out with."""
        if self.by_revision is None:
            return self.fixed_popularity
        return self.by_revision.counts(source.channel, source.revision)

    def _encoding(self) -> list[Any]:
        """What, beyond the input, decides the bytes of layers (part of cache keys)."""
        return [[c.codec, c.level] for c in self.settings.outputs()]

    def _retry_after(self) -> int:
        """Seconds a refused client should wait: about one build."""
        with self._lock:
            recent = list(self._durations)
        if not recent:
            return DEFAULT_RETRY_AFTER
        return max(1, min(60, math.ceil(sum(recent) / len(recent))))

    def _stored_image(self, doc_key: str) -> BuiltImage | None:
        """A stored image whose blobs are all present, or None (then it is rebuilt)."""
        data = self.storage.get_document(doc_key)
        if data is None:
            return None
        try:
            built = BuiltImage.from_json(json.loads(data))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s", doc_key)
            return None
        digests = [d.digest for d in built.manifests.values()]
        digests += [layer.digest for layer in built.layers]
        for manifest in built.manifests.values():
            digests += referenced_digests(self.storage.read_blob(manifest.digest) or b"")
        if any(self.storage.locate_blob(d) is None for d in digests):
            log.warning("%s lost blobs; rebuilding", doc_key)
            return None
        self.storage.mark_used(doc_key)
        return built

    def _build(
        self,
        request: ImageRequest,
        source: ResolvedSource,
        platform: Platform,
        doc_key: str,
        name: str,
        tag: str,
        popularity: Counts,
    ) -> BuiltImage:
        image_key = doc_key.removeprefix("images/").removesuffix(".json")
        build = Build(name, tag, str(platform), request.packages, image_key)
        self.events.build_started(build)
        log.info("build started", extra={"image": name, "tag": tag, "build": build.id})
        try:
            with self._building.held():
                built, packed, profile = self._build_steps(
                    build, request, source, platform, doc_key, popularity
                )
        except Exception as exc:  # every build that starts must end on the page
            self._failed(build, exc)
            raise
        layers = [(layer.size, p) for layer, p in zip(built.layers, packed, strict=True)]
        record = build.record(SUCCESS, layers, profile=profile.to_json())
        self.events.build_ended(build, record)
        with self._lock:
            self._durations.append(record.duration)
        log.info(
            "built %s for %s in %.2fs (%d layers, packed %d layers)",
            name, platform, record.duration, record.layers, record.packed,
            extra={"image": name, "tag": tag, "build": build.id,
                   "duration": round(record.duration, 3),
                   "layers": record.layers, "packed": record.packed, "size": record.size,
                   "profile": profile.to_json()},
        )  # fmt: skip
        return built

    def _build_steps(
        self,
        build: Build,
        request: ImageRequest,
        source: ResolvedSource,
        platform: Platform,
        doc_key: str,
        popularity: Counts,
    ) -> tuple[BuiltImage, list[bool], BuildProfile]:
        started = time.perf_counter()
        on_log = self._log_listener(build)
        try:
            packages = self.nix.resolve(
                self.sources.nix_source(source),
                platform.nix_system,
                request.packages,
                self.settings.overlays,
                on_log,
            )
        except UnknownPackages as exc:
            detail: dict[str, Any] = {}
            if exc.names:
                detail["unknown_packages"] = exc.names
            if exc.refused:
                detail["refused_packages"] = exc.refused
            suggestions = self._suggestions(source, platform, exc.names) if exc.names else {}
            if suggestions:
                detail["suggestions"] = suggestions
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, detail, message=str(exc)) from exc
        evaluated = time.perf_counter()
        built, packed, profile = self._pack(packages, platform, build, popularity.popularity)
        stored = time.perf_counter()
        self.storage.put_document(doc_key, json.dumps(built.to_json()).encode())
        done = time.perf_counter()
        profile = replace(
            profile,
            evaluate=evaluated - started,
            documents=profile.documents + done - stored,
            total=done - started,
        )
        return built, packed, profile

    def _failed(self, build: Build, exc: Exception) -> None:
        fields = {"image": build.image, "tag": build.tag, "build": build.id}
        if isinstance(exc, RegistryError) and exc.code is ErrorCode.MANIFEST_UNKNOWN:
            self.events.build_ended(build, build.record(UNKNOWN_PACKAGES, error=exc.message))
            log.info("build rejected: %s", exc.message, extra=fields)
            return
        log_tail = exc.log_tail if isinstance(exc, BuildFailed) else None
        self.events.build_ended(build, build.record(FAILURE, error=str(exc), log_tail=log_tail))
        log.warning("build failed: %s", exc, extra=fields)

    def _log_listener(self, build: Build) -> Callable[[str], None]:
        def listen(line: str) -> None:
            build.log(line)
            self.events.build_log(build, line)

        return listen

    def _phase(self, build: Build, phase: str, total: int = 0) -> None:
        build.enter(phase, total)
        self.events.build_phase(build)

    def _suggestions(
        self, source: ResolvedSource, platform: Platform, names: Sequence[str]
    ) -> dict[str, list[str]]:
        """Close matches for each unknown name, written as image names."""
        out: dict[str, list[str]] = {}
        try:
            nix_source = self.sources.nix_source(source)
            for name in names:
                close = self.catalog.suggest(nix_source, source.revision, platform.nix_system, name)
                components = [c for c in map(image_component, close) if c]
                if components:
                    out[image_component(name) or name] = components
        except NixeryError:
            log.warning("no suggestions: listing the package set failed", exc_info=True)
        return out

    def _advance(self, build: Build) -> None:
        build.advance()
        self.events.build_phase(build)

    def builds_in_progress(self) -> int:
        return self._building.value

    def builds_queued(self) -> int:
        """Requests waiting for a build that another request started."""
        return max(self._asking.value - self._building.value, 0)

    def lookup(self, query: str, tag: str = LATEST) -> Lookup:
        """What `query` means in the package set behind `tag`."""
        source = self.sources.resolve(tag)
        system = self.settings.platforms[0].nix_system
        return self.catalog.lookup(self.sources.nix_source(source), source.revision, system, query)

    def _pack(
        self,
        packages: Sequence[ResolvedPackage],
        platform: Platform,
        build: Build,
        popularity: Mapping[str, int],
    ) -> tuple[BuiltImage, list[bool], BuildProfile]:
        """Build the packages and store the image; say which layers were packed
        and where the time went."""
        started = time.perf_counter()
        self._phase(build, "building")
        # The roots keep the closure from Nix's garbage collector until packed.
        with temporary_roots() as roots:
            outs = self.nix.realise(packages, self._log_listener(build), roots)
            realised = time.perf_counter()
            graph = self.nix.closure(outs)
            self._check_size(graph)
            groups = self.group(graph, packages, popularity)
            grouped = time.perf_counter()
            self._phase(build, "packing", total=len(groups) + 1)
            jobs: list[Callable[[], _LayerResult]] = [
                functools.partial(self._store_layer, group) for group in groups
            ]
            jobs.append(functools.partial(self._root_layer, packages))
            sizes = [g.size for g in groups] + [0]
            results = self._run_packers(jobs, sizes, lambda: self._advance(build))
            packed = time.perf_counter()
        self._phase(build, "storing")
        built = self._store_image(packages, platform, [r.layer for r in results])
        stored = time.perf_counter()
        fresh = [r for r in results if r.packed_bytes is not None]
        profile = BuildProfile(
            realise=realised - started,
            closure=grouped - realised,
            packing=packed - grouped,
            store_io=sum(r.store_io for r in results),
            documents=stored - packed,
            packed_bytes=sum(r.packed_bytes or 0 for r in fresh),
        )
        return built, [r.packed_bytes is not None for r in results], profile

    def _store_image(
        self, packages: Sequence[ResolvedPackage], platform: Platform, layers: Sequence[Layer]
    ) -> BuiltImage:
        """Store the configs and manifests of both formats over `layers`."""
        histories = [_history(layer.paths) for layer in layers[:-1]] + ["nixery: root file system"]
        names = {p.attr_path for p in packages}
        cmd = ["bash"] if "bashInteractive" in names else None
        config = image_config(platform, [layer.diff_id for layer in layers], histories, cmd)
        manifests: dict[str, Descriptor] = {}
        for fmt in Format:
            config_doc = config_document(config, fmt)
            self.storage.put_blob(config_doc.data)
            descriptors = [layer.descriptor(fmt) for layer in layers]
            manifest = manifest_document(fmt, config_doc.descriptor(), descriptors)
            self.storage.put_blob(manifest.data)
            manifests[fmt.name] = manifest.descriptor()
        return BuiltImage(manifests, tuple(layers), tuple(sorted(names)))

    def _check_size(self, graph: ClosureGraph) -> None:
        limit = self.settings.max_image_size
        size = graph.total_size()
        if limit is not None and size > limit:
            raise RegistryError(
                ErrorCode.DENIED,
                {"closure_size": size, "max_image_size": limit},
                f"the image's closure is {size} bytes, over this registry's limit of {limit}",
            )

    def _run_packers(
        self,
        jobs: Sequence[Callable[[], _LayerResult]],
        sizes: Sequence[int],
        on_done: Callable[[], None],
    ) -> list[_LayerResult]:
        """Run the layer jobs on the shared packing pool, biggest first so that
        the longest job does not start last; results keep the jobs' order.
        `on_done` is called on this thread as each job finishes."""
        order = sorted(range(len(jobs)), key=lambda i: -sizes[i])
        futures: dict[Future[_LayerResult], int] = {}
        try:
            for i in order:
                # Each job carries this build's log context (its request id).
                run = contextvars.copy_context().run
                futures[self._packers.submit(run, jobs[i])] = i
            results: dict[int, _LayerResult] = {}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                on_done()
            return [results[i] for i in range(len(jobs))]
        finally:
            for future in futures:
                future.cancel()  # after a failure: skip what has not started

    def group(
        self,
        graph: ClosureGraph,
        packages: Sequence[ResolvedPackage],
        popularity: Mapping[str, int] | None = None,
    ) -> list[LayerGroup]:
        """Split the closure into package layers (the root layer comes on top);
        `popularity` defaults to the fixed data the service was given."""
        if popularity is None:
            popularity = self.fixed_popularity.popularity
        # Packages in every image rank as the most popular, whatever they are called.
        everywhere = {p.out for p in packages if p.attr_path in ALWAYS_INCLUDED}
        return group_layers(graph, popularity, self.settings.layer_budget, most_popular=everywhere)

    def _store_layer(self, group: LayerGroup) -> _LayerResult:
        key = f"layers/{_key(FORMAT_VERSION, group.paths, self._encoding())}.json"
        return self._cached_layer(
            key,
            group.paths,
            lambda outputs: archive.write_store_layer(group.paths, outputs),
        )

    def _root_layer(self, packages: Sequence[ResolvedPackage]) -> _LayerResult:
        pairs = sorted((p.attr_path, p.out) for p in packages)
        key = f"layers/{_key(FORMAT_VERSION, 'root', pairs, self._encoding())}.json"
        return self._cached_layer(
            key, (), lambda outputs: archive.write_root_layer(root_entries(pairs), outputs)
        )

    def _cached_layer(
        self, key: str, paths: tuple[str, ...], write: Callable[[list[Output]], PackedLayer]
    ) -> _LayerResult:
        """Reuse the layer stored under `key`, or pack it with `write`; a layer
        wanted by several builds at once is packed once."""
        cached = self._stored_layer(key)
        self.events.cache_lookup("layer", cached is not None)
        if cached is not None:
            # Reused by a build in progress: gc must not take it now.
            zstd = [cached.zstd.digest] if cached.zstd else []
            self.storage.mark_used(key, cached.digest, *zstd)
            return _LayerResult(cached, None, 0.0)
        return self._layer_flight.do(key, lambda: self._pack_layer(key, paths, write))

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

    def _pack_layer(
        self, key: str, paths: tuple[str, ...], write: Callable[[list[Output]], PackedLayer]
    ) -> _LayerResult:
        cached = self._stored_layer(key)  # packed by a flight that just ended
        if cached is not None:
            return _LayerResult(cached, None, 0.0)
        compressions = self.settings.outputs()
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(self.storage.blob_writer()) for _ in compressions]
            sinks = [_TimedSink(w) for w in writers]
            packed = write([Output(c, s) for c, s in zip(compressions, sinks, strict=True)])
            blobs = [Blob(sink.commit(), sink.writer.size) for sink in sinks]
        gzip, zstd = blobs[0], (blobs[1] if len(blobs) > 1 else None)
        layer = Layer(gzip.digest, gzip.size, packed.diff_id, paths, zstd)
        started = time.perf_counter()
        self.storage.put_document(key, json.dumps(layer.to_json()).encode())
        store_io = sum(s.seconds for s in sinks) + time.perf_counter() - started
        with self._lock:
            self.layers_packed += 1
        return _LayerResult(layer, packed.uncompressed_size, store_io)


class _Count:
    """A thread-safe count of callers inside a block."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self, limit: int | None = None) -> bool:
        """Count one more caller, unless `limit` callers are already inside."""
        with self._lock:
            if limit is not None and self.value >= limit:
                return False
            self.value += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.value -= 1


def _history(paths: Sequence[str]) -> str:
    return "nixery: " + " ".join(store_path_name(p) for p in paths)


__all__ = [
    "BuildFailed",
    "BuildProfile",
    "BuildSettings",
    "BuiltImage",
    "ClosureGraph",
    "ImageService",
    "Layer",
]
