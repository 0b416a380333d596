"""Package sources: what an image tag means and where Nix finds packages.

A source resolves a tag to a `ResolvedSource`: what to hand Nix, a revision
string that identifies the package set's content (part of every cache key),
and whether that revision can never change (then cached images are served
without running Nix).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nixery.errors import ConfigError, ErrorCode, RegistryError
from nixery.nix import NixSource

DEFAULT_CHANNEL = "nixos-unstable"
CHANNEL_URL = "https://github.com/NixOS/nixpkgs/archive/{rev}.tar.gz"
LATEST = "latest"


@dataclass(frozen=True)
class SourceConfig:
    kind: str  # "path", "channel", "git"
    value: str

    def describe(self) -> str:
        return f"{self.kind} {self.value}"


@dataclass(frozen=True)
class ResolvedSource:
    nix: NixSource
    revision: str
    immutable: bool


def source_config(
    pkgs_path: str | None, channel: str | None, pkgs_repo: str | None
) -> SourceConfig:
    given = [
        (k, v) for k, v in (("path", pkgs_path), ("channel", channel), ("git", pkgs_repo)) if v
    ]
    if len(given) > 1:
        names = ", ".join(k for k, _ in given)
        raise ConfigError(f"configure only one package source, got: {names}")
    if not given:
        return SourceConfig("channel", DEFAULT_CHANNEL)
    kind, value = given[0]
    if kind == "path":
        path = os.path.abspath(value)
        if not os.path.exists(path):
            raise ConfigError(f"package set path {path} does not exist")
        return SourceConfig("path", path)
    return SourceConfig(kind, value)


class Sources:
    """Resolves tags against the configured source."""

    def __init__(self, config: SourceConfig, channel_url: str = CHANNEL_URL):
        self.config = config
        self.channel_url = channel_url

    def tags(self) -> list[str]:
        """The tags worth listing: every tag `resolve` accepts that has a name.

        Local paths and channels have only `latest`; versioned sources list
        their revisions' names here.
        """
        return [LATEST]

    def resolve(self, tag: str) -> ResolvedSource:
        kind = self.config.kind
        if tag != LATEST:
            # Tags select revisions only for versioned sources.
            raise RegistryError(
                ErrorCode.MANIFEST_UNKNOWN,
                {"tag": tag, "reason": f"a {kind} source serves only the tag '{LATEST}'"},
            )
        if kind == "path":
            return ResolvedSource(
                NixSource("path", self.config.value), f"path:{self.config.value}", False
            )
        if kind == "channel":
            url = self.channel_url.format(rev=self.config.value)
            return ResolvedSource(NixSource("tarball", url), f"channel:{self.config.value}", False)
        raise RegistryError(
            ErrorCode.UNSUPPORTED,
            {"source": kind, "reason": "this source kind is not supported yet"},
        )
