"""Wires settings into a running registry: storage, Nix, sources, service, app."""

from __future__ import annotations

import logging
from typing import Any

from bottle import Bottle

from nixery.config import S3Settings, Settings
from nixery.errors import ConfigError
from nixery.http.app import create_app
from nixery.http.auth import make_access_control
from nixery.http.ratelimit import RateLimit
from nixery.images.activity import Activity, BuildEvents, Fanout
from nixery.images.model import BuildSettings
from nixery.images.service import ImageService
from nixery.ops.health import Health, storage_writable
from nixery.ops.metrics import Metrics
from nixery.packages.nix import Nix, default_gc_roots_dir
from nixery.packages.popularity import PopularityByRevision, is_template, load_popularity
from nixery.packages.sources import Sources
from nixery.storage import FilesystemStorage, Storage

log = logging.getLogger(__name__)


def make_storage(settings: Settings) -> Storage:
    return open_storage(settings.s3, settings.storage_path)


def open_storage(s3: S3Settings | None, storage_path: str, clean_tmp: bool = True) -> Storage:
    """The S3 backend if `s3` is set, else the directory `storage_path`."""
    if s3 is not None:
        # Imported here: boto3 is needed only by those who use it.
        from nixery.storage.s3 import S3Storage

        return S3Storage(
            s3.bucket,
            prefix=s3.prefix,
            endpoint_url=s3.endpoint,
            region=s3.region,
            path_style=s3.path_style,
            redirect=s3.redirect,
            presign_expiry=s3.presign_expiry,
            public_base_url=s3.blob_base_url,
        )
    try:
        return FilesystemStorage(storage_path, clean_tmp=clean_tmp)
    except OSError as exc:
        raise ConfigError(f"cannot use storage path {storage_path}: {exc.strerror or exc}") from exc


def make_nix(settings: Settings) -> Nix:
    options = {"builders": settings.nix_builders} if settings.nix_builders else {}
    roots = settings.gc_roots_dir or default_gc_roots_dir()
    return Nix(timeout=settings.nix_timeout, extra_options=options, gc_roots_dir=roots)


def make_service(
    settings: Settings, events: BuildEvents | None = None, storage: Storage | None = None
) -> ImageService:
    popularity: dict[str, int] | PopularityByRevision = {}
    if settings.popularity and is_template(settings.popularity):
        # Fetched when a package set revision is first built, and optional.
        popularity = PopularityByRevision(settings.popularity, settings.source.cache_dir)
        log.info("popularity data per package set revision from %s", settings.popularity)
    elif settings.popularity:
        popularity = load_popularity(settings.popularity)
        log.info("popularity data for %d names from %s", len(popularity), settings.popularity)
    build = BuildSettings(
        layer_budget=settings.layer_budget,
        compression_level=settings.compression_level,
        platforms=settings.platforms,
        overlays=settings.overlays,
        max_packages=settings.security.max_packages,
        max_image_size=settings.security.max_image_size,
        compression=settings.compression,
        zstd_level=settings.zstd_level,
        max_builds=settings.max_builds,
        max_queue=settings.max_queue,
        max_waiting=settings.max_waiting,
        nix_snapshotter=settings.nix_snapshotter,
        lease_ttl=settings.lease_ttl,
    )
    nix = make_nix(settings)
    return ImageService(
        storage or make_storage(settings),
        nix,
        Sources(settings.source, nix, settings.overlays, settings.nix_timeout),
        build,
        popularity,
        events,
    )


def make_plugins(settings: Settings) -> list[Any]:
    """Rate limit first (cheapest), then access control."""
    security = settings.security
    plugins: list[Any] = []
    if security.rate_limit > 0:
        plugins.append(RateLimit(security.rate_limit, security.rate_burst))
    access = make_access_control(
        security.auth, security.read_only_cache, security.auth_key, security.token_realm
    )
    if access is not None:
        plugins.append(access)
    return plugins


def build_app(settings: Settings, metrics: Metrics | None = None) -> Bottle:
    """`metrics`: given when the server reports into them too."""
    storage = make_storage(settings)
    # Found out now, so that a store ignoring conditional writes is logged at start.
    if storage.leases_exclusive():
        log.info("builds are shared with other replicas through leases in the storage")
    activity = Activity(storage)
    metrics = metrics or Metrics()
    service = make_service(settings, Fanout(activity, metrics), storage)
    metrics.track(service.builds_in_progress, service.builds_queued)
    health = Health({"storage": storage_writable(storage), "nix": service.nix.version})
    return create_app(
        service,
        storage,
        activity=activity,
        metrics=metrics,
        health=health,
        plugins=make_plugins(settings),
    )
