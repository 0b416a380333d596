"""A build's first step: the image's names resolved to packages, or a 404
that explains itself.

The explanation tells "not defined" from the other ways a name can fail:
unknown names come with close matches from the package set, packages that
refuse to evaluate with Nix's reason, and, when overlays are configured,
which overlays the names were looked up with and how they were applied.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from nixery.errors import ErrorCode, NixeryError, RegistryError, UnknownPackages
from nixery.images.model import BuildSettings
from nixery.packages.catalog import Catalog
from nixery.packages.names import ImageRequest, image_component
from nixery.packages.nix import OVERLAY_MODES, Nix, Resolution
from nixery.packages.platforms import Platform
from nixery.packages.sources import ResolvedSource, Sources

log = logging.getLogger(__name__)


class PackageResolver:
    """Resolves an image's names in its package set, with their metadata."""

    def __init__(self, nix: Nix, sources: Sources, settings: BuildSettings, catalog: Catalog):
        self.nix = nix
        self.sources = sources
        self.settings = settings
        self.catalog = catalog

    def resolve(
        self,
        request: ImageRequest,
        source: ResolvedSource,
        platform: Platform,
        on_log: Callable[[str], None],
        roots: str,
    ) -> Resolution:
        """The image's packages (their derivations rooted in `roots`); names
        that do not resolve are a 404 MANIFEST_UNKNOWN with details."""
        try:
            return self.nix.resolve_with_metadata(
                self.sources.nix_source(source),
                platform.nix_system,
                request.packages,
                self.settings.overlays,
                on_log,
                roots,
            )
        except UnknownPackages as exc:
            detail = self._explain(exc, source, platform)
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, detail, message=str(exc)) from exc

    def _explain(
        self, exc: UnknownPackages, source: ResolvedSource, platform: Platform
    ) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        if exc.names:
            detail["unknown_packages"] = exc.names
        if exc.refused:
            detail["refused_packages"] = exc.refused
        suggestions = self._suggestions(source, platform, exc.names) if exc.names else {}
        if suggestions:
            detail["suggestions"] = suggestions
        if self.settings.overlays:
            detail["overlays"] = _overlays_detail(self.settings.overlays, exc)
        return detail

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


def _overlays_detail(overlays: Sequence[str], exc: UnknownPackages) -> dict[str, Any]:
    """Which overlays an unknown name was looked up with, and how they were
    applied: "not defined" and "overlay not applied" then look different.
    File names only: the server's directories are not the client's business."""
    applied = OVERLAY_MODES.get(exc.overlays_applied or "", "unknown")
    return {"files": [os.path.basename(o) for o in overlays], "applied": applied}
