"""The build pipeline: one image for one platform, step by step.

resolve (names -> packages, with their metadata) -> realise (Nix builds or substitutes them) ->
closure (the graph of store paths) -> layers (grouping) -> pack (`packing`)
-> store (configs and manifests, their bills of materials (`referrers`),
then the image record).

Every build reports its phases, log lines and outcome to `BuildEvents`, and
the image record is written last, so a crash leaves nothing that points at
a missing blob.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace

from nixery.assembly import sbom
from nixery.assembly.layers import LayerGroup, group_layers
from nixery.assembly.manifest import (
    Descriptor,
    Format,
    config_document,
    image_config,
    manifest_document,
    nix_layer_annotations,
)
from nixery.assembly.rootfs import NONROOT_USER, ImageUser
from nixery.errors import (
    BuildFailed,
    ErrorCode,
    RegistryError,
)
from nixery.images.activity import FAILURE, SUCCESS, UNKNOWN_PACKAGES, Build, BuildEvents
from nixery.images.model import BuildProfile, BuildSettings, BuiltImage, Layer
from nixery.images.packing import LayerPacker
from nixery.images.referrers import store_sboms
from nixery.images.resolving import PackageResolver
from nixery.leases import Leases
from nixery.packages.catalog import Catalog
from nixery.packages.graph import ClosureGraph, store_path_name
from nixery.packages.names import ALWAYS_INCLUDED, ImageRequest
from nixery.packages.nix import (
    Nix,
    PackageMetadata,
    ResolvedPackage,
)
from nixery.packages.platforms import Platform
from nixery.packages.popularity import Counts
from nixery.packages.sources import ResolvedSource, Sources
from nixery.singleflight import Count
from nixery.storage import Storage

log = logging.getLogger(__name__)

# The grouping rule: `group_layers`, or another with its signature (benchmarks).
Layering = Callable[..., list[LayerGroup]]


class BuildPipeline:
    """Builds and stores images; counts the builds running and times them."""

    def __init__(
        self,
        storage: Storage,
        nix: Nix,
        sources: Sources,
        settings: BuildSettings,
        events: BuildEvents,
        catalog: Catalog,
        leases: Leases,
        layering: Layering = group_layers,
    ):
        self.storage = storage
        self.nix = nix
        self.settings = settings
        self.events = events
        self.resolver = PackageResolver(nix, sources, settings, catalog)
        self.layering = layering
        self.packer = LayerPacker(storage, settings, events, leases)
        self._lock = threading.Lock()
        self._durations: deque[float] = deque(maxlen=16)
        self.running = Count()  # builds running

    def recent_durations(self) -> list[float]:
        """How long the last successful builds took, in seconds."""
        with self._lock:
            return list(self._durations)

    def build(
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
            with self.running.held():
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
        # The roots keep the packages' derivations (written by the evaluation),
        # then their closure, from Nix's garbage collector until packed.
        with self.nix.temporary_roots() as roots:
            on_log = self._log_listener(build)
            resolution = self.resolver.resolve(request, source, platform, on_log, roots)
            evaluated = time.perf_counter()
            packages = resolution.packages
            user = NONROOT_USER if request.nonroot else None
            built, packed, profile = self._pack(
                packages, resolution.metadata, platform, build, popularity, roots, user
            )
        stored = time.perf_counter()
        # The record points at the blobs: they are made durable first, at once.
        self.storage.sync_blobs()
        self.storage.put_document(doc_key, json.dumps(built.to_json()).encode())
        done = time.perf_counter()
        profile = replace(
            profile,
            evaluate=evaluated - started,
            documents=profile.documents + done - stored,
            total=done - started,
            metadata_entries=len(resolution.metadata),
        )
        return built, packed, profile

    def _pack(
        self,
        packages: Sequence[ResolvedPackage],
        metadata: Mapping[str, PackageMetadata],
        platform: Platform,
        build: Build,
        popularity: Counts,
        roots: str,
        user: ImageUser | None = None,
    ) -> tuple[BuiltImage, list[bool], BuildProfile]:
        """Build the packages (rooted in `roots`) and store the image; say
        which layers were packed and where the time went."""
        started = time.perf_counter()
        self._phase(build, "building")
        outs = self.nix.realise(packages, self._log_listener(build), roots)
        realised = time.perf_counter()
        graph = self.nix.closure(outs)
        self._check_size(graph)
        groups = self.group(graph, packages, popularity.popularity)
        grouped = time.perf_counter()
        # The bills of materials need only the closure: they are made while the
        # layers pack (in worker processes when storage is local), not after.
        name = "/".join(sorted({p.attr_path for p in packages}))
        bodies: Future[sbom.Bodies] = Future()
        threading.Thread(
            target=_make_bodies, args=(bodies, name, graph, metadata), name="nixery-sbom"
        ).start()
        self._phase(build, "packing", total=len(groups) + 1)
        try:
            results = self.packer.pack(groups, packages, lambda: self._advance(build), user)
        finally:
            bodies.exception()  # waits: no build leaves that thread behind
        packed = time.perf_counter()
        self._phase(build, "storing")
        built = self._store_image(packages, platform, [r.layer for r in results], user)
        manifests_stored = time.perf_counter()
        # Every manifest gets its bills of materials before the record names it.
        indexes = store_sboms(self.storage, name, built.manifests, graph, metadata, bodies.result())
        built = replace(built, referrers=indexes)
        stored = time.perf_counter()
        fresh = [r for r in results if r.packed_bytes is not None]
        profile = BuildProfile(
            realise=realised - started,
            closure=grouped - realised,
            packing=packed - grouped,
            store_io=sum(r.store_io for r in results),
            documents=stored - packed,
            sbom=stored - manifests_stored,
            packed_bytes=sum(r.packed_bytes or 0 for r in fresh),
        )
        return built, [r.packed_bytes is not None for r in results], profile

    def _check_size(self, graph: ClosureGraph) -> None:
        limit = self.settings.max_image_size
        size = graph.total_size()
        if limit is not None and size > limit:
            raise RegistryError(
                ErrorCode.DENIED,
                {"closure_size": size, "max_image_size": limit},
                f"the image's closure is {size} bytes, over this registry's limit of {limit}",
            )

    def group(
        self,
        graph: ClosureGraph,
        packages: Sequence[ResolvedPackage],
        popularity: Mapping[str, int],
    ) -> list[LayerGroup]:
        """Split the closure into package layers (the root layer comes on top)."""
        # Packages in every image rank as the most popular, whatever they are called.
        everywhere = {p.out for p in packages if p.attr_path in ALWAYS_INCLUDED}
        return self.layering(graph, popularity, self.settings.layer_budget, most_popular=everywhere)

    def _store_image(
        self,
        packages: Sequence[ResolvedPackage],
        platform: Platform,
        layers: Sequence[Layer],
        user: ImageUser | None = None,
    ) -> BuiltImage:
        """Store the configs and manifests of both formats over `layers`."""
        histories = [_history(layer.paths) for layer in layers[:-1]] + ["nixery: root file system"]
        names = {p.attr_path for p in packages}
        cmd = ["bash"] if "bashInteractive" in names else None
        diff_ids = [layer.diff_id for layer in layers]
        run_as = user.config_user if user else None
        config = image_config(platform, diff_ids, histories, cmd, run_as)
        manifests: dict[str, Descriptor] = {}
        for fmt in Format:
            config_doc = config_document(config, fmt)
            self.storage.put_blob(config_doc.data)
            descriptors = [self._descriptor(layer, fmt) for layer in layers]
            manifest = manifest_document(fmt, config_doc.descriptor(), descriptors)
            self.storage.put_blob(manifest.data)
            manifests[fmt.name] = manifest.descriptor()
        return BuiltImage(manifests, tuple(layers), tuple(sorted(names)))

    def _descriptor(self, layer: Layer, fmt: Format) -> Descriptor:
        """A layer in a manifest; with `nix_snapshotter`, an OCI manifest's
        store layers also name their store paths. The root layer holds no
        store path, and Docker's manifests define no annotations."""
        descriptor = layer.descriptor(fmt)
        if self.settings.nix_snapshotter and fmt is Format.OCI and layer.paths:
            return replace(descriptor, annotations=nix_layer_annotations(layer.paths))
        return descriptor

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

    def _advance(self, build: Build) -> None:
        build.advance()
        self.events.build_phase(build)


def _make_bodies(
    into: Future[sbom.Bodies],
    name: str,
    graph: ClosureGraph,
    metadata: Mapping[str, PackageMetadata],
) -> None:
    try:
        into.set_result(sbom.bodies(name, graph, metadata))
    except BaseException as exc:  # handed to the build
        into.set_exception(exc)


def _history(paths: Sequence[str]) -> str:
    return "nixery: " + " ".join(store_path_name(p) for p in paths)
