"""Wires settings into a running registry: storage, Nix, sources, service, app."""

from __future__ import annotations

from bottle import Bottle

from nixery.app import create_app
from nixery.config import Settings
from nixery.images import BuildSettings, ImageService
from nixery.nix import Nix
from nixery.popularity import load_popularity
from nixery.sources import Sources
from nixery.storage import FilesystemStorage, Storage


def make_storage(settings: Settings) -> Storage:
    return FilesystemStorage(settings.storage_path)


def make_service(settings: Settings) -> ImageService:
    popularity = load_popularity(settings.popularity) if settings.popularity else {}
    build = BuildSettings(
        layer_budget=settings.layer_budget,
        compression_level=settings.compression_level,
        platforms=settings.platforms,
        overlays=settings.overlays,
    )
    nix = Nix(timeout=settings.nix_timeout)
    return ImageService(
        make_storage(settings),
        nix,
        Sources(settings.source, nix, settings.overlays, settings.nix_timeout),
        build,
        popularity,
    )


def build_app(settings: Settings) -> Bottle:
    service = make_service(settings)
    return create_app(service, service.storage)
