"""The build queue: from a request to a built image, stored or built once.

An image is looked up by a key computed from everything that decides its
bytes; a stored one is served as it is (the revision pins the package set,
so it is never stale). Otherwise its build is queued on the build workers,
shared by every request that wants the same image at the same time, and
by every replica sharing the storage: the build runs under the image's
lease (`Leases`), and a replica that finds another holding it waits for
the stored image instead of building it again. Past
the configured limits, requests are refused with 429 and a Retry-After of
about one build, so server threads stay free for cached images.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from concurrent.futures import Future

from nixery.assembly.layers import LAYERING_VERSION
from nixery.assembly.manifest import referenced_digests
from nixery.errors import BuildNotAllowed, ErrorCode, QueueFull, RegistryError
from nixery.images.activity import BuildEvents
from nixery.images.model import FORMAT_VERSION, BuildSettings, BuiltImage, cache_key
from nixery.images.pipeline import BuildPipeline
from nixery.images.referrers import artifact_blobs
from nixery.images.served import ServedImages
from nixery.leases import Leases
from nixery.packages.names import ImageRequest
from nixery.packages.platforms import Platform
from nixery.packages.popularity import FixedPopularity, PopularityByRevision
from nixery.packages.sources import LATEST, ResolvedSource
from nixery.singleflight import Count, SingleFlight
from nixery.storage import Storage

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER = 5  # seconds, before any build has been timed
MAX_KEYS = 4096  # image keys remembered


class BuildQueue:
    """Runs at most `max_builds` builds at once, each image's build once."""

    def __init__(
        self,
        storage: Storage,
        settings: BuildSettings,
        popularity: FixedPopularity | PopularityByRevision,
        events: BuildEvents,
        pipeline: BuildPipeline,
        leases: Leases,
    ):
        self.storage = storage
        self.settings = settings
        self.popularity = popularity
        self.events = events
        self.pipeline = pipeline
        self.leases = leases
        # Builds run on their own workers: a client that leaves cancels nothing.
        self._flight: SingleFlight[BuiltImage] = SingleFlight(
            settings.max_builds, settings.max_queue, "nixery-build"
        )
        self._asking = Count()  # requests inside a (possibly shared) build
        self.served = ServedImages()  # images checked in storage, for warm requests
        self._keys: dict[tuple[str, tuple[str, ...], str, tuple[str, ...], str], str] = {}

    def image(
        self,
        request: ImageRequest,
        source: ResolvedSource,
        platform: Platform,
        name: str | None = None,
        tag: str = LATEST,
        may_build: bool = True,
    ) -> BuiltImage:
        """The built image for one platform (see `ImageService.image`)."""
        future = self.submit(request, source, platform, name, tag, may_build)
        return self.wait([future])[0]

    def wait(self, futures: Sequence[Future[BuiltImage]]) -> list[BuiltImage]:
        """The images of `futures`, in order; refused past `max_waiting` waiters."""
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

    def submit(
        self,
        request: ImageRequest,
        source: ResolvedSource,
        platform: Platform,
        name: str | None,
        tag: str,
        may_build: bool = True,
    ) -> Future[BuiltImage]:
        """The stored image, or its build queued (or joined, if one is running)."""
        popularity = self.popularity.counts(source.channel, source.revision)
        key = self._image_key(source.revision, request, platform.nix_system, popularity.digest)
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
                lambda: self.leases.run_once(
                    f"images/{key}",
                    lambda: self._stored_image(doc_key),
                    lambda: self.pipeline.build(
                        request, source, platform, doc_key, label, tag, popularity
                    ),
                    on_wait=lambda: self.events.lease_waited("image"),
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

    def _image_key(self, revision: str, request: ImageRequest, system: str, popularity: str) -> str:
        # Remembered: serialising every input on each request costs more than
        # serving a stored manifest.
        memo = (revision, request.packages, system, tuple(request.variant()), popularity)
        key = self._keys.get(memo)
        if key is None:
            # The layering's version too: the same inputs laid out by another
            # version of group_layers are another image.
            key = cache_key(
                FORMAT_VERSION, LAYERING_VERSION, revision, request.packages, system,
                self.settings.overlays, self.settings.layer_budget, self.settings.encoding(),
                popularity, *request.variant(), *self.settings.manifest_variant(),
            )  # fmt: skip
            if len(self._keys) >= MAX_KEYS:
                self._keys.clear()
            self._keys[memo] = key
        return key

    def _retry_after(self) -> int:
        """Seconds a refused client should wait: about one build."""
        recent = self.pipeline.recent_durations()
        if not recent:
            return DEFAULT_RETRY_AFTER
        return max(1, min(60, math.ceil(sum(recent) / len(recent))))

    def _stored_image(self, doc_key: str) -> BuiltImage | None:
        """A stored image whose blobs are all present, or None (then it is rebuilt)."""
        kept = self.served.image(doc_key)
        # Its record gone (expired by gc), the image is looked up in full.
        if kept is not None and self.storage.has_document(doc_key):
            self.storage.mark_used(doc_key)  # in use: gc judges by the marks
            return kept
        data = self.storage.get_document(doc_key)
        if data is None:
            return None
        try:
            built = BuiltImage.from_json(json.loads(data))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s", doc_key)
            return None
        if built.referrers.keys() != built.manifests.keys():
            # Stored before images had bills of materials: built again, which
            # reuses every stored layer.
            log.info("%s has no SBOMs; rebuilding", doc_key)
            return None
        digests = [d.digest for d in built.manifests.values()]
        digests += [layer.digest for layer in built.layers]
        for manifest in built.manifests.values():
            digests += referenced_digests(self.storage.read_blob(manifest.digest) or b"")
        for index in built.referrers.values():
            digests += artifact_blobs(self.storage, index)
        if any(self.storage.locate_blob(d) is None for d in digests):
            log.warning("%s lost blobs; rebuilding", doc_key)
            return None
        self.storage.mark_used(doc_key)
        self.served.keep_image(doc_key, built, digests)
        return built

    def builds_in_progress(self) -> int:
        return self.pipeline.running.value

    def builds_queued(self) -> int:
        """Requests waiting for a build that another request started."""
        return max(self._asking.value - self.pipeline.running.value, 0)
