"""The orchestrator: from a requested image to stored manifests.

It composes the pure steps (name -> packages -> closure graph -> layers ->
archives -> manifests) with the two modules that touch the outside world:
`nix` and `storage`. Everything it writes is content addressed, and the
small documents that index blobs are written last, so a crash at any point
leaves nothing that points at a missing blob.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from nixery import archive
from nixery.activity import FAILURE, SUCCESS, UNKNOWN_PACKAGES, Build, BuildEvents
from nixery.archive import PackedLayer
from nixery.catalog import Catalog, Lookup
from nixery.errors import (
    BuildFailed,
    BuildNotAllowed,
    ErrorCode,
    NixeryError,
    RegistryError,
    UnknownPackages,
)
from nixery.graph import ClosureGraph, store_path_name
from nixery.layers import DEFAULT_BUDGET, LayerGroup, group_layers
from nixery.manifest import (
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
from nixery.names import (
    ImageRequest,
    image_component,
    is_digest,
    is_sha256,
    parse_image_name,
    validate_digest,
    validate_tag,
)
from nixery.nix import Nix, ResolvedPackage, temporary_roots
from nixery.platforms import Platform, host_platform
from nixery.rootfs import root_entries
from nixery.singleflight import SingleFlight
from nixery.sources import LATEST, ResolvedSource, Sources
from nixery.storage import BlobWriter, Storage

log = logging.getLogger(__name__)

# Bump when the bytes of layers or manifests change for the same input.
FORMAT_VERSION = "1"
# Larger blobs are never read as manifests (the spec's suggested manifest limit).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class BuildSettings:
    layer_budget: int = DEFAULT_BUDGET
    compression_level: int = archive.DEFAULT_COMPRESSION_LEVEL
    platforms: tuple[Platform, ...] = field(default_factory=lambda: (host_platform(),))
    overlays: tuple[str, ...] = ()
    max_packages: int = 64
    max_image_size: int | None = None  # closure NAR bytes


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    diff_id: str
    paths: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "size": self.size,
            "diff_id": self.diff_id,
            "paths": list(self.paths),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Layer:
        return Layer(data["digest"], data["size"], data["diff_id"], tuple(data["paths"]))


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
        popularity: Mapping[str, int] | None = None,
        events: BuildEvents | None = None,
    ):
        self.storage = storage
        self.nix = nix
        self.sources = sources
        self.settings = settings
        self.popularity = dict(popularity or {})
        self.events = events or BuildEvents()
        self.catalog = Catalog(nix, settings.overlays)
        self._flight: SingleFlight[BuiltImage] = SingleFlight()
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
            return self._stored_manifest(reference)
        validate_tag(reference)
        source = self.sources.resolve(reference)
        platforms = (request.platform,) if request.platform else self.settings.platforms
        if accept.index_format is not None and len(platforms) > 1:
            images = [
                (p, self.image(request, source, p, name, reference, may_build)) for p in platforms
            ]
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
        key = _key(
            FORMAT_VERSION, source.revision, request.packages, platform.nix_system,
            self.settings.overlays, self.settings.layer_budget, self.settings.compression_level,
            sorted(self.popularity.items()),
        )  # fmt: skip
        doc_key = f"images/{key}.json"
        # The revision pins the package set, so a stored image is never stale.
        cached = self._stored_image(doc_key)
        self.events.cache_lookup("image", cached is not None)
        if cached is not None:
            return cached
        if not may_build:
            raise BuildNotAllowed()
        label = name or "/".join(request.requested) or "/".join(request.packages)
        with self._asking.held():
            return self._flight.do(
                key,
                lambda: (
                    self._stored_image(doc_key)
                    or self._build(request, source, platform, doc_key, label, tag)
                ),
            )

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
    ) -> BuiltImage:
        image_key = doc_key.removeprefix("images/").removesuffix(".json")
        build = Build(name, tag, str(platform), request.packages, image_key)
        self.events.build_started(build)
        log.info("build started", extra={"image": name, "tag": tag, "build": build.id})
        try:
            with self._building.held():
                built, packed = self._build_steps(build, request, source, platform, doc_key)
        except Exception as exc:  # every build that starts must end on the page
            self._failed(build, exc)
            raise
        layers = [(layer.size, p) for layer, p in zip(built.layers, packed, strict=True)]
        record = build.record(SUCCESS, layers)
        self.events.build_ended(build, record)
        log.info(
            "built %s for %s in %.2fs (%d layers, packed %d layers)",
            name, platform, record.duration, record.layers, record.packed,
            extra={"image": name, "tag": tag, "build": build.id,
                   "duration": round(record.duration, 3),
                   "layers": record.layers, "packed": record.packed, "size": record.size},
        )  # fmt: skip
        return built

    def _build_steps(
        self,
        build: Build,
        request: ImageRequest,
        source: ResolvedSource,
        platform: Platform,
        doc_key: str,
    ) -> tuple[BuiltImage, list[bool]]:
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
            detail: dict[str, Any] = {"unknown_packages": exc.names}
            suggestions = self._suggestions(source, platform, exc.names)
            if suggestions:
                detail["suggestions"] = suggestions
            raise RegistryError(
                ErrorCode.MANIFEST_UNKNOWN,
                detail,
                message="unknown packages: " + ", ".join(exc.names),
            ) from exc
        built, packed = self._pack(packages, platform, build)
        self.storage.put_document(doc_key, json.dumps(built.to_json()).encode())
        return built, packed

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
        self, packages: Sequence[ResolvedPackage], platform: Platform, build: Build
    ) -> tuple[BuiltImage, list[bool]]:
        """Build the packages and store the image; also say which layers were packed."""
        self._phase(build, "building")
        with temporary_roots() as roots:
            outs = self.nix.realise(packages, self._log_listener(build), roots)
            graph = self.nix.closure(outs)
            self._check_size(graph)
            groups = group_layers(graph, self.popularity, self.settings.layer_budget)
            self._phase(build, "packing", total=len(groups) + 1)
            results = []
            for group in groups:
                results.append(self._store_layer(group))
                self._advance(build)
            results.append(self._root_layer(packages))
            self._advance(build)
        self._phase(build, "storing")
        layers = [layer for layer, _ in results]
        packed = [was_packed for _, was_packed in results]
        histories = [_history(layer.paths) for layer in layers[:-1]] + ["nixery: root file system"]
        names = {p.attr_path for p in packages}
        cmd = ["bash"] if "bashInteractive" in names else None
        config = image_config(platform, [layer.diff_id for layer in layers], histories, cmd)
        manifests: dict[str, Descriptor] = {}
        for fmt in Format:
            config_doc = config_document(config, fmt)
            self.storage.put_blob(config_doc.data)
            descriptors = [Descriptor(fmt.layer_type, layer.digest, layer.size) for layer in layers]
            manifest = manifest_document(fmt, config_doc.descriptor(), descriptors)
            self.storage.put_blob(manifest.data)
            manifests[fmt.name] = manifest.descriptor()
        return BuiltImage(manifests, tuple(layers), tuple(sorted(names))), packed

    def _check_size(self, graph: ClosureGraph) -> None:
        limit = self.settings.max_image_size
        size = graph.total_size()
        if limit is not None and size > limit:
            raise RegistryError(
                ErrorCode.DENIED,
                {"closure_size": size, "max_image_size": limit},
                f"the image's closure is {size} bytes, over this registry's limit of {limit}",
            )

    def _store_layer(self, group: LayerGroup) -> tuple[Layer, bool]:
        key = f"layers/{_key(FORMAT_VERSION, group.paths, self.settings.compression_level)}.json"
        level = self.settings.compression_level
        return self._cached_layer(
            key, group.paths, lambda w: archive.write_store_layer(group.paths, w, level)
        )

    def _root_layer(self, packages: Sequence[ResolvedPackage]) -> tuple[Layer, bool]:
        pairs = sorted((p.attr_path, p.out) for p in packages)
        key = f"layers/{_key(FORMAT_VERSION, 'root', pairs, self.settings.compression_level)}.json"
        level = self.settings.compression_level
        return self._cached_layer(
            key, (), lambda w: archive.write_root_layer(root_entries(pairs), w, level)
        )

    def _cached_layer(
        self, key: str, paths: tuple[str, ...], write: Callable[[BlobWriter], PackedLayer]
    ) -> tuple[Layer, bool]:
        """Reuse the layer stored under `key`, or pack it with `write` (then True)."""
        cached = self.storage.get_document(key)
        if cached is not None:
            try:
                layer: Layer | None = Layer.from_json(json.loads(cached))
            except (ValueError, KeyError, TypeError):
                layer = None
            if layer is not None and self.storage.locate_blob(layer.digest) is not None:
                self.events.cache_lookup("layer", True)
                # Reused by a build in progress: gc must not take it now.
                self.storage.mark_used(key, layer.digest)
                return layer, False
        self.events.cache_lookup("layer", False)
        with self.storage.blob_writer() as writer:
            packed = write(writer)
            digest = writer.commit()
            layer = Layer(digest, writer.size, packed.diff_id, paths)
        self.layers_packed += 1
        self.storage.put_document(key, json.dumps(layer.to_json()).encode())
        return layer, True


class _Count:
    """A thread-safe count of callers inside a block."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            self.value += 1
        try:
            yield
        finally:
            with self._lock:
                self.value -= 1


def _history(paths: Sequence[str]) -> str:
    return "nixery: " + " ".join(store_path_name(p) for p in paths)


__all__ = ["BuildFailed", "BuildSettings", "BuiltImage", "ClosureGraph", "ImageService", "Layer"]
