"""Validated settings, built from CLI options (which already merged the
environment and the config file)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nixery.errors import ConfigError
from nixery.platforms import Platform, host_platform, parse_platform
from nixery.sources import SourceConfig, source_config

# The options that each name a package source; at most one may be given.
SOURCE_OPTIONS = ("pkgs_path", "channel", "pkgs_repo", "flake")


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    source: SourceConfig
    storage_backend: str
    storage_path: str
    nix_timeout: float
    popularity: str | None
    layer_budget: int
    platforms: tuple[Platform, ...]
    overlays: tuple[str, ...]
    compression_level: int

    @staticmethod
    def from_options(options: Mapping[str, Any]) -> Settings:
        return Settings(
            host=options["host"],
            port=options["port"],
            source=source_config(
                _pkgs_path(options),
                options.get("channel"),
                options.get("pkgs_repo"),
                options.get("flake"),
                channel_url=options.get("channel_url"),
                revision_url=options.get("channel_revision_url"),
                ttl=options.get("channel_ttl"),
                allow_tag_versions=options.get("allow_tag_versions"),
                cache_dir=options.get("source_cache"),
            ),
            storage_backend=options["storage_backend"],
            storage_path=os.path.abspath(options["storage_path"]),
            nix_timeout=float(options["nix_timeout"]),
            popularity=options.get("popularity"),
            layer_budget=int(options["layer_budget"]),
            platforms=parse_platforms(options.get("platforms")),
            overlays=tuple(os.path.abspath(o) for o in options.get("overlays") or ()),
            compression_level=int(options["compression_level"]),
        )


def _pkgs_path(options: Mapping[str, Any]) -> str | None:
    """`--pkgs-path`, or `--default-pkgs-path` when no source is configured at all."""
    if any(options.get(name) for name in SOURCE_OPTIONS):
        return options.get("pkgs_path")
    return options.get("default_pkgs_path")


def parse_platforms(text: str | None) -> tuple[Platform, ...]:
    if not text:
        return (host_platform(),)
    try:
        platforms = tuple(parse_platform(p) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not platforms or len(set(platforms)) != len(platforms):
        raise ConfigError(f"invalid platform list {text!r}")
    return platforms
