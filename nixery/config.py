"""Validated settings, built from CLI options (which already merged the
environment and the config file)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from nixery.errors import ConfigError
from nixery.packages.platforms import Platform, host_cores, host_platform, parse_platform
from nixery.packages.sources import SourceConfig, source_config
from nixery.storage.base import validate_key

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client may hold of the server (docs/security.md, "Slow and abusive clients")."""

    head_timeout: float = 5.0  # seconds from connection (or first byte) to a complete request
    idle_timeout: float = 60.0  # seconds a kept-alive connection may wait for its next request
    send_timeout: float = 10.0  # seconds a client may take to accept each SEND_STEP bytes
    per_address: int = 512  # open connections per client address; 0: no limit
    active_per_address: int = 16  # requests per client address in worker threads; 0: no limit
    trusted_proxies: tuple[Network, ...] = ()


def parse_networks(text: str | Iterable[str] | None) -> tuple[Network, ...]:
    """`10.0.0.0/8,192.0.2.7` -> networks; a ConfigError names a bad entry."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    networks = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"invalid proxy address or network {item!r}") from None
    return tuple(networks)


@dataclass(frozen=True)
class S3Settings:
    """Where the S3 backend keeps things and how clients fetch blobs."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    path_style: bool = False
    redirect: bool = True
    presign_expiry: int = 900
    blob_base_url: str | None = None


# The options that each name a package source; at most one may be given.
SOURCE_OPTIONS = ("pkgs_path", "channel", "pkgs_repo", "flake")


@dataclass(frozen=True)
class SecuritySettings:
    """Limits, access control and TLS (see README, "Security")."""

    max_packages: int = 64
    max_image_size: int | None = None  # bytes of the closure's NAR size
    auth: str | None = None  # "htpasswd:FILE" or "token:FILE"
    auth_key: str | None = None
    token_realm: str | None = None
    read_only_cache: bool = False
    tls: tuple[str, str] | None = None  # certificate and key files
    rate_limit: float = 0  # requests per second per client; 0: no limit
    rate_burst: int = 200
    connections: ConnectionLimits = ConnectionLimits()

    @staticmethod
    def from_options(options: Mapping[str, Any]) -> SecuritySettings:
        cert, key = options.get("tls_cert"), options.get("tls_key")
        if bool(cert) != bool(key):
            raise ConfigError("--tls-cert and --tls-key go together")
        for path in (cert, key):
            if path and not os.path.isfile(path):
                raise ConfigError(f"TLS file {path} does not exist")
        auth = options.get("auth") or None
        if auth:
            kind, _, path = auth.partition(":")
            if kind not in ("htpasswd", "token") or not path:
                raise ConfigError(f"--auth must be htpasswd:FILE or token:FILE, got {auth!r}")
            if not os.path.isfile(path):
                raise ConfigError(f"htpasswd file {path} does not exist")
        return SecuritySettings(
            max_packages=int(options.get("max_packages") or 64),
            max_image_size=parse_size(options.get("max_image_size")),
            auth=auth,
            auth_key=options.get("auth_key") or None,
            token_realm=options.get("token_realm") or None,
            read_only_cache=bool(options.get("read_only_cache")),
            tls=(os.path.abspath(cert), os.path.abspath(key)) if cert and key else None,
            rate_limit=float(options.get("rate_limit") or 0),
            rate_burst=int(options.get("rate_burst") or 200),
            connections=connection_limits(options),
        )


def connection_limits(options: Mapping[str, Any]) -> ConnectionLimits:
    """What one client may hold of the server; defaults for options not given."""
    default = ConnectionLimits()

    def get(name: str, fallback: float) -> Any:
        value = options.get(name)
        return fallback if value is None else value

    return ConnectionLimits(
        head_timeout=float(get("head_timeout", default.head_timeout)),
        idle_timeout=float(get("idle_timeout", default.idle_timeout)),
        send_timeout=float(get("send_timeout", default.send_timeout)),
        per_address=int(get("max_connections_per_address", default.per_address)),
        active_per_address=int(get("max_active_per_address", default.active_per_address)),
        trusted_proxies=parse_networks(options.get("trusted_proxies")),
    )


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int | None) -> int | None:
    """`500M`, `2G`, `1048576` -> bytes; empty or 0 -> None (no limit)."""
    if text is None or str(text).strip() in ("", "0"):
        return None
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1] if value and value[-1] in _SIZE_UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise ConfigError(f"invalid size {text!r}: use e.g. 500M or 2G") from None
    if size <= 0:
        raise ConfigError(f"invalid size {text!r}: must be positive")
    return size


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
    s3: S3Settings | None = None
    nix_builders: str | None = None
    security: SecuritySettings = SecuritySettings()
    compression: str = "gzip"
    zstd_level: int = 3
    max_builds: int = field(default_factory=host_cores)
    max_queue: int = 16
    max_waiting: int = 48
    nix_snapshotter: bool = False
    gc_roots_dir: str | None = None  # None: Nix's default
    lease_ttl: float = 30.0

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
            overlays=_overlays(options.get("overlays") or ()),
            compression_level=int(options["compression_level"]),
            s3=s3_settings(options),
            nix_builders=options.get("nix_builders") or None,
            security=SecuritySettings.from_options(options),
            compression=options.get("compression") or "gzip",
            zstd_level=int(options.get("zstd_level") or 3),
            max_builds=int(options.get("max_builds") or host_cores()),
            max_queue=int(options.get("max_queue", 16)),
            max_waiting=int(options.get("max_waiting", 48)),
            nix_snapshotter=bool(options.get("nix_snapshotter")),
            gc_roots_dir=_absolute(options.get("gc_roots_dir")),
            lease_ttl=float(options.get("lease_ttl") or 30.0),
        )


def _overlays(given: Iterable[str]) -> tuple[str, ...]:
    """Overlay files, or directories (imported by Nix as their default.nix,
    and digested whole, so an overlay may import the files beside it)."""
    overlays = tuple(os.path.abspath(o) for o in given)
    for overlay in overlays:
        if os.path.isdir(overlay) and not os.path.isfile(os.path.join(overlay, "default.nix")):
            raise ConfigError(f"overlay directory {overlay} has no default.nix")
    return overlays


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


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


S3_OPTIONS = ("s3_bucket", "s3_prefix", "s3_endpoint", "s3_region", "blob_base_url")


def s3_settings(options: Mapping[str, Any]) -> S3Settings | None:
    """The S3 backend's settings, or None for another backend (then none may be set)."""
    if options["storage_backend"] != "s3":
        given = [f"--{o.replace('_', '-')}" for o in S3_OPTIONS if options.get(o)]
        if given:
            raise ConfigError(f"{', '.join(given)} need --storage-backend s3")
        return None
    if not options.get("s3_bucket"):
        raise ConfigError("--storage-backend s3 needs --s3-bucket")
    return S3Settings(
        bucket=options["s3_bucket"],
        prefix=_key_prefix(options.get("s3_prefix") or ""),
        endpoint=_http_url(options.get("s3_endpoint"), "--s3-endpoint"),
        region=options.get("s3_region") or None,
        path_style=bool(options.get("s3_path_style")),
        redirect=options.get("s3_redirect", "on") == "on",
        presign_expiry=int(options.get("s3_presign_expiry") or 900),
        blob_base_url=_http_url(options.get("blob_base_url"), "--blob-base-url"),
    )


def _key_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    try:
        return validate_key(prefix) if prefix else ""
    except ValueError as exc:
        raise ConfigError(f"--s3-prefix: {exc}") from exc


def _http_url(value: str | None, option: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ConfigError(f"{option} must be an http(s) URL without a query, got {value!r}")
    return value
