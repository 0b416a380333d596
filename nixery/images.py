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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nixery import archive
from nixery.archive import PackedLayer
from nixery.errors import BuildFailed, ErrorCode, RegistryError, UnknownPackages
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
)
from nixery.names import (
    ImageRequest,
    is_digest,
    is_sha256,
    parse_image_name,
    validate_digest,
    validate_tag,
)
from nixery.nix import Nix, ResolvedPackage
from nixery.platforms import Platform, host_platform
from nixery.rootfs import root_entries
from nixery.singleflight import SingleFlight
from nixery.sources import ResolvedSource, Sources
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
    ):
        self.storage = storage
        self.nix = nix
        self.sources = sources
        self.settings = settings
        self.popularity = dict(popularity or {})
        self._flight: SingleFlight[BuiltImage] = SingleFlight()
        self.layers_packed = 0  # observable by tests and metrics

    # -- requests -------------------------------------------------------

    def manifest(self, name: str, reference: str, accept: Negotiated) -> Document:
        request = parse_image_name(name, self.settings.max_packages)
        if is_digest(reference):
            validate_digest(reference)
            return self._stored_manifest(reference)
        validate_tag(reference)
        source = self.sources.resolve(reference)
        platforms = (request.platform,) if request.platform else self.settings.platforms
        if accept.index_format is not None and len(platforms) > 1:
            images = [(p, self.image(request, source, p)) for p in platforms]
            return self._index(images, accept.index_format)
        # Without a list the client gets the first configured platform; only it is built.
        image = self.image(request, source, platforms[0])
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
        self, request: ImageRequest, source: ResolvedSource, platform: Platform
    ) -> BuiltImage:
        """The built image for one platform, from cache or from Nix."""
        key = _key(
            FORMAT_VERSION, source.revision, request.packages, platform.nix_system,
            self.settings.overlays, self.settings.layer_budget, self.settings.compression_level,
            sorted(self.popularity.items()),
        )  # fmt: skip
        doc_key = f"images/{key}.json"
        # The revision pins the package set, so a stored image is never stale.
        cached = self._stored_image(doc_key)
        if cached is not None:
            return cached
        return self._flight.do(
            key,
            lambda: self._stored_image(doc_key) or self._build(request, source, platform, doc_key),
        )

    def _stored_image(self, doc_key: str) -> BuiltImage | None:
        cached = self.storage.get_document(doc_key)
        return None if cached is None else BuiltImage.from_json(json.loads(cached))

    def _build(
        self, request: ImageRequest, source: ResolvedSource, platform: Platform, doc_key: str
    ) -> BuiltImage:
        started = time.monotonic()
        try:
            packages = self.nix.resolve(
                self.sources.nix_source(source),
                platform.nix_system,
                request.packages,
                self.settings.overlays,
            )
        except UnknownPackages as exc:
            raise RegistryError(
                ErrorCode.MANIFEST_UNKNOWN,
                {"unknown_packages": exc.names},
                message="unknown packages: " + ", ".join(exc.names),
            ) from exc
        built, packed = self._pack(packages, platform)
        self.storage.put_document(doc_key, json.dumps(built.to_json()).encode())
        log.info(
            "built %s for %s in %.2fs (%d layers, packed %d layers)",
            ",".join(request.packages), platform, time.monotonic() - started,
            len(built.layers), packed,
        )  # fmt: skip
        return built

    def _pack(
        self, packages: Sequence[ResolvedPackage], platform: Platform
    ) -> tuple[BuiltImage, int]:
        """Build the packages and store the image; also return how many layers were packed."""
        outs = self.nix.realise(packages)
        graph = self.nix.closure(outs)
        groups = group_layers(graph, self.popularity, self.settings.layer_budget)
        results = [self._store_layer(group) for group in groups]
        results.append(self._root_layer(packages))
        layers = [layer for layer, _ in results]
        packed = sum(1 for _, was_packed in results if was_packed)
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
            layer = Layer.from_json(json.loads(cached))
            if self.storage.locate_blob(layer.digest) is not None:
                return layer, False
        with self.storage.blob_writer() as writer:
            packed = write(writer)
            digest = writer.commit()
            layer = Layer(digest, writer.size, packed.diff_id, paths)
        self.layers_packed += 1
        self.storage.put_document(key, json.dumps(layer.to_json()).encode())
        return layer, True


def _history(paths: Sequence[str]) -> str:
    return "nixery: " + " ".join(store_path_name(p) for p in paths)


__all__ = ["BuildFailed", "BuildSettings", "BuiltImage", "ClosureGraph", "ImageService", "Layer"]
