"""Serving images: tags, manifests and indexes, from storage or from a build.

`ImageService` is the one object the HTTP side and the CLI ask. It answers
from what is stored when it can, and otherwise asks the build queue
(`queue`), which runs the build pipeline (`pipeline`, `packing`) at most
once per image. The records it reads and writes are in `model`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from nixery.assembly.layers import LayerGroup, group_layers
from nixery.assembly.manifest import (
    Document,
    Format,
    Negotiated,
    filter_referrers,
    index_document,
    media_type_of,
    referenced_digests,
    referrers_index,
)
from nixery.errors import ErrorCode, RegistryError
from nixery.images.activity import BuildEvents
from nixery.images.model import BuildProfile, BuildSettings, BuiltImage, Layer
from nixery.images.pipeline import BuildPipeline, Layering
from nixery.images.queue import BuildQueue
from nixery.images.referrers import stored_index
from nixery.leases import Leases
from nixery.packages.catalog import Catalog, Lookup
from nixery.packages.graph import ClosureGraph
from nixery.packages.names import (
    ImageRequest,
    is_digest,
    is_sha256,
    parse_image_name,
    validate_digest,
    validate_tag,
)
from nixery.packages.nix import Nix, ResolvedPackage
from nixery.packages.platforms import Platform
from nixery.packages.popularity import FixedPopularity, PopularityByRevision
from nixery.packages.sources import LATEST, ResolvedSource, Sources
from nixery.storage import Storage

# Larger blobs are never read as manifests (the spec's suggested manifest limit).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
# The tag clients without the referrers API read a manifest's referrers
# from (`<alg>-<hex>` of its digest, OCI distribution spec 1.1).
REFERRERS_TAG = re.compile(r"sha256-([a-f0-9]{64})")


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
        layering: Layering = group_layers,
    ):
        self.storage = storage
        self.nix = nix
        self.sources = sources
        self.settings = settings
        # Fixed data, or data fetched for each package set revision.
        self.popularity = (
            popularity
            if isinstance(popularity, PopularityByRevision)
            else FixedPopularity(popularity or {})
        )
        self.events = events or BuildEvents()
        self.catalog = Catalog(nix, settings.overlays)
        # Replicas sharing the storage build each image, and pack each layer, once.
        self.leases = Leases(storage, settings.lease_ttl)
        self.pipeline = BuildPipeline(
            storage, nix, sources, settings, self.events, self.catalog,
            self.leases, layering,
        )  # fmt: skip
        self.builds = BuildQueue(
            storage, settings, self.popularity, self.events, self.pipeline, self.leases
        )
        self.served = self.builds.served

    # -- requests -------------------------------------------------------

    def manifest(
        self, name: str, reference: str, accept: Negotiated, may_build: bool = True
    ) -> Document:
        """The manifest for `reference`; `may_build=False` serves only cached images."""
        request = parse_image_name(name, self.settings.max_packages)
        if is_digest(reference):
            validate_digest(reference)
            # An image pinned by digest is in use too: gc reads the marks of
            # its manifests, as it reads its document's for pulls by tag.
            return self._stored_manifest(reference, mark=True)
        validate_tag(reference)
        fallback = REFERRERS_TAG.fullmatch(reference)
        if fallback:
            # Never a package set's tag: the tag schema clients fall back to.
            index = stored_index(self.storage, "sha256:" + fallback.group(1))
            if index is None:
                raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"tag": reference})
            return index
        source = self.sources.resolve(reference)
        platforms = (request.platform,) if request.platform else self.settings.platforms
        if accept.index_format is not None and len(platforms) > 1:
            # Every platform's build is queued at once, so they run side by side.
            futures = [
                self.builds.submit(request, source, p, name, reference, may_build)
                for p in platforms
            ]
            images = list(zip(platforms, self.builds.wait(futures), strict=True))
            return self._index(images, accept.index_format)
        # Without a list the client gets the first configured platform; only it is built.
        image = self.image(request, source, platforms[0], name, reference, may_build)
        return self._stored_manifest(image.manifests[accept.formats[0].name].digest)

    def referrers(self, name: str, digest: str, artifact_type: str | None = None) -> Document:
        """The index of the artifacts whose subject is the manifest `digest`
        (empty if there are none), only those of `artifact_type` if given."""
        parse_image_name(name, self.settings.max_packages)
        validate_digest(digest)
        index = stored_index(self.storage, digest) if is_sha256(digest) else None
        index = index or referrers_index([])
        return filter_referrers(index, artifact_type) if artifact_type else index

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

    def _stored_manifest(self, digest: str, mark: bool = False) -> Document:
        """A stored manifest, kept in memory once read (see `served`); `mark`
        records its use (and that of the manifests an index lists)."""
        document = self.served.document(digest)
        if document is None:
            document = self.manifest_by_digest(digest)
            if document is None:
                raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"digest": digest})
            self.served.keep_document(document, referenced_digests(document.data))
        if mark:
            listed = referenced_digests(document.data) if document.is_index else []
            self.storage.mark_used(None, digest, *listed)
        return document

    def blob_missing(self, digest: str) -> None:
        """A blob was asked for and is not stored: forget the images and
        manifests kept in memory that reference it, so the next request for
        them asks storage (and rebuilds what is lost)."""
        self.served.blob_missing(digest)

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
        self.storage.sync_blobs()  # pinned by digest from now on
        return documents[fmt]

    # -- building (see `queue` and `pipeline`) ----------------------------

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
        return self.builds.image(request, source, platform, name, tag, may_build)

    def group(
        self,
        graph: ClosureGraph,
        packages: Sequence[ResolvedPackage],
        source: ResolvedSource | None = None,
    ) -> list[LayerGroup]:
        """Split the closure into package layers (the root layer comes on top),
        with the popularity data of `source` (or the fixed data)."""
        channel, revision = (source.channel, source.revision) if source else (None, "")
        counts = self.popularity.counts(channel, revision)
        return self.pipeline.group(graph, packages, counts.popularity)

    @property
    def layers_packed(self) -> int:
        """Layers packed (not reused) since start; observable by tests."""
        return self.pipeline.packer.layers_packed

    def builds_in_progress(self) -> int:
        return self.builds.builds_in_progress()

    def builds_queued(self) -> int:
        """Requests waiting for a build that another request started."""
        return self.builds.builds_queued()

    def lookup(self, query: str, tag: str = LATEST) -> Lookup:
        """What `query` means in the package set behind `tag`."""
        source = self.sources.resolve(tag)
        system = self.settings.platforms[0].nix_system
        return self.catalog.lookup(self.sources.nix_source(source), source.revision, system, query)


# The data model used to live here; its names stay importable from this module.
__all__ = [
    "BuildProfile",
    "BuildSettings",
    "BuiltImage",
    "ImageService",
    "Layer",
]
