"""Package sources: what an image tag means and where Nix finds packages.

`Sources.resolve(tag)` pins a tag to an immutable revision without running
Nix (except to lock a flake): a channel name becomes the commit its
`git-revision` file names, a branch or tag the commit `git ls-remote`
reports, a local path the digest of its content. The revision is part of
every image's cache key, so a cached image is served without Nix. Moving
references are re-resolved at most every `ttl` seconds.

Only when an image has to be built does `Sources.nix_source` turn the pin
into something Nix can import: a channel tarball or a git commit is fetched
once into the Nix store (kept from garbage collection by a root in the cache
directory) and from then on used as that immutable store path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode

from nixery.errors import BuildFailed, ConfigError, ErrorCode, RegistryError, SourceUnavailable
from nixery.packages import git
from nixery.packages.fingerprint import Fingerprinter
from nixery.packages.names import TAG_RE
from nixery.packages.nix import Nix, NixSource
from nixery.singleflight import SingleFlight

log = logging.getLogger(__name__)

DEFAULT_CHANNEL = "nixos-unstable"
CHANNEL_URL = "https://github.com/NixOS/nixpkgs/archive/{rev}.tar.gz"
CHANNEL_REVISION_URL = "https://channels.nixos.org/{channel}/git-revision"
DEFAULT_TTL = 600.0
LATEST = "latest"
STORE_DIR = "/nix/store/"
# A configured channel goes into a URL path: one plain segment.
CHANNEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Tags that may name a channel when tag versions are allowed.
TAG_CHANNEL_RE = re.compile(r"(nixos|nixpkgs)-[a-z0-9][a-z0-9.-]{0,60}")
FLAKE_REF_TYPES = ("github", "gitlab", "sourcehut")
# Fetching a whole repository or nixpkgs may take longer than one Nix step.
MIN_FETCH_TIMEOUT = 600.0
MAX_MEMO_ENTRIES = 4096

T = TypeVar("T")


@dataclass(frozen=True)
class SourceConfig:
    kind: str  # "path", "channel", "git", "flake"
    value: str
    channel_url: str = CHANNEL_URL  # `{rev}` is replaced by a commit
    revision_url: str = CHANNEL_REVISION_URL  # `{channel}` is replaced by a channel name
    ttl: float = DEFAULT_TTL  # seconds a moving reference's resolution is trusted
    allow_tag_versions: bool = False  # channel mode: tags may name channels or commits
    cache_dir: str = field(default_factory=lambda: default_cache_dir())  # mirrors, GC roots

    def describe(self) -> str:
        return f"{self.kind} {self.value}"


@dataclass(frozen=True)
class Pin:
    """An immutable revision and where it lives: a path, a tarball URL, a
    git commit of the configured repository, or a locked flake URL."""

    kind: str  # "path", "tarball", "git", "flake"
    location: str


@dataclass(frozen=True)
class ResolvedSource:
    """A tag pinned to content: `revision` identifies the package set and the
    overlays applied to it (it is part of every image's cache key)."""

    revision: str
    pin: Pin
    channel: str | None = None  # the nixpkgs channel it was resolved from, if any


def default_cache_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "nixery-sources")


def source_config(
    pkgs_path: str | None,
    channel: str | None,
    pkgs_repo: str | None,
    flake: str | None = None,
    **options: Any,
) -> SourceConfig:
    """Validate the one configured source; `options` are SourceConfig's other fields."""
    candidates = (("path", pkgs_path), ("channel", channel), ("git", pkgs_repo), ("flake", flake))
    given = [(k, v) for k, v in candidates if v]
    if len(given) > 1:
        names = ", ".join(k for k, _ in given)
        raise ConfigError(f"configure only one package source, got: {names}")
    kind, value = given[0] if given else ("channel", DEFAULT_CHANNEL)
    options = {k: v for k, v in options.items() if v is not None}
    if "cache_dir" in options:
        options["cache_dir"] = os.path.abspath(options["cache_dir"])
    if kind == "path":
        value = os.path.abspath(value)
        if not os.path.exists(value):
            raise ConfigError(f"package set path {value} does not exist")
    elif kind == "channel":
        if not CHANNEL_RE.fullmatch(value):
            raise ConfigError(f"invalid channel {value!r}: give a channel name or a commit")
        for key, placeholder in (("channel_url", "{rev}"), ("revision_url", "{channel}")):
            if placeholder not in options.get(key, placeholder):
                raise ConfigError(f"the {key.replace('_', ' ')} must contain {placeholder}")
    else:
        if value.startswith("-") or any(ord(c) < 0x20 for c in value):
            raise ConfigError(f"invalid {kind} source {value[:80]!r}")
        if kind == "flake" and "#" in value:
            raise ConfigError("give the flake without an attribute path ('#...')")
        if kind == "git" and os.path.isdir(value):
            value = os.path.abspath(value)
    if options.get("ttl", 0) < 0:
        raise ConfigError("the resolution TTL must not be negative")
    return SourceConfig(kind, value, **options)


class _Memo:
    """Resolutions of moving references, each trusted for `ttl` seconds.

    Concurrent lookups of one key share one resolution. When re-resolving
    fails because the source cannot be reached, the previous answer is kept
    (and logged) rather than failing every pull.
    """

    def __init__(self, ttl: float, clock: Callable[[], float]):
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Hashable, tuple[float, Any]] = {}
        self._flight: SingleFlight[Any] = SingleFlight()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and self._clock() - entry[0] < self._ttl:
            return cast(T, entry[1])
        return cast(T, self._flight.do(key, lambda: self._refresh(key, compute, entry)))

    def _refresh(self, key: Hashable, compute: Callable[[], T], old: tuple[float, Any] | None) -> T:
        try:
            value = compute()
        except SourceUnavailable as exc:
            if old is None:
                raise
            log.warning("re-resolving %s failed, keeping the previous answer: %s", key, exc)
            value = old[1]
        with self._lock:
            if len(self._entries) >= MAX_MEMO_ENTRIES:
                del self._entries[min(self._entries, key=lambda k: self._entries[k][0])]
            self._entries[key] = (self._clock(), value)
        return value


def _unknown(tag: str, reason: str) -> RegistryError:
    return RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"tag": tag, "reason": reason})


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Sources:
    """Resolves tags against the configured source and hands pins to Nix."""

    def __init__(
        self,
        config: SourceConfig,
        nix: Nix | None = None,
        overlays: tuple[str, ...] = (),
        timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.nix = nix or Nix(timeout=timeout)
        self.overlays = overlays
        self.timeout = timeout
        self.fetch_timeout = max(timeout, MIN_FETCH_TIMEOUT)
        self._memo = _Memo(config.ttl, clock)
        self._fingerprints = Fingerprinter()
        self._fetches: SingleFlight[str] = SingleFlight()
        self._mirror_lock = threading.Lock()
        self._resolvers: dict[str, Callable[[str], ResolvedSource]] = {
            "path": self._path,
            "channel": self._channel,
            "git": self._git,
            "flake": self._flake,
        }

    # -- tags -> revisions -------------------------------------------------

    def resolve(self, tag: str) -> ResolvedSource:
        """Pin `tag`; RegistryError MANIFEST_UNKNOWN if it names nothing."""
        resolver = self._resolvers.get(self.config.kind)
        if resolver is None:
            raise ConfigError(f"unknown package source kind {self.config.kind!r}")
        resolved = resolver(tag)
        if self.overlays:
            digest = self._memo.get(("overlays",), self._overlays_digest)
            resolved = replace(resolved, revision=f"{resolved.revision}+overlays:{digest}")
        return resolved

    def tags(self) -> list[str]:
        """Every tag that names something: `latest`, and a repository's branches and tags."""
        names = {LATEST}
        repo = self._repository()
        if repo is not None:
            names.update(n for n in self._remote_refs(repo).names() if TAG_RE.fullmatch(n))
        return sorted(names)

    def _repository(self) -> str | None:
        """The git repository whose refs tags name, if there is one."""
        if self.config.kind == "git":
            return self.config.value
        base, _, query = self.config.value.partition("?")
        pinned = any(k in ("ref", "rev") for k, _ in parse_qsl(query))
        if self.config.kind == "flake" and base.startswith("git+") and not pinned:
            return base.removeprefix("git+")
        return None

    def _path(self, tag: str) -> ResolvedSource:
        if tag != LATEST:
            raise _unknown(tag, f"a local path source serves only the tag '{LATEST}'")
        path = self.config.value
        if path.startswith(STORE_DIR):
            return ResolvedSource(f"store:{path}", Pin("path", path))
        digest = self._memo.get(("path",), lambda: self._content_digest(path))
        return ResolvedSource(f"path:{path}@{digest}", Pin("path", path))

    def _channel(self, tag: str) -> ResolvedSource:
        name = self.config.value
        if tag != LATEST:
            if not self.config.allow_tag_versions:
                raise _unknown(tag, f"tags other than '{LATEST}' need --allow-tag-versions")
            if not (git.is_commit(tag) or TAG_CHANNEL_RE.fullmatch(tag)):
                raise _unknown(tag, "the tag is neither a channel name nor a 40-hex commit")
            name = tag
        commit = name if git.is_commit(name) else self._channel_commit(name)
        if commit is None:
            raise _unknown(tag, f"channel {name} does not exist")
        url = self.config.channel_url.replace("{rev}", commit)
        channel = None if git.is_commit(name) else name
        return ResolvedSource(f"commit:{commit}", Pin("tarball", url), channel)

    def _channel_commit(self, name: str) -> str | None:
        url = self.config.revision_url.replace("{channel}", name)
        return self._memo.get(("channel", name), lambda: _read_revision(url, self.timeout))

    def _git(self, tag: str) -> ResolvedSource:
        if git.is_commit(tag):
            commit = tag
        else:
            refs = self._remote_refs(self.config.value)
            if tag == LATEST:
                if refs.head is None:
                    raise _unknown(tag, "the repository has no default branch")
                commit = refs.head
            else:
                found = refs.lookup(tag)
                if found is None:
                    raise _unknown(tag, "no branch or tag of that name")
                commit = found[1]
        return ResolvedSource(f"commit:{commit}", Pin("git", commit))

    def _remote_refs(self, url: str) -> git.RemoteRefs:
        return self._memo.get(("refs", url), lambda: git.ls_remote(url, self.timeout))

    def _flake(self, tag: str) -> ResolvedSource:
        ref = self.config.value if tag == LATEST else self._flake_ref(tag)
        if ref is None:
            raise _unknown(tag, "this flake reference cannot select other versions by tag")
        lock = self._memo.get(("flake", ref), lambda: self.nix.flake_metadata(ref, self.timeout))
        # The content (its flake.lock pins the inputs), not the ref that led to it:
        # tags naming one commit share images.
        nar_hash = lock.locked.get("narHash")
        content = nar_hash if isinstance(nar_hash, str) else json.dumps(lock.locked, sort_keys=True)
        return ResolvedSource(f"flake:{content}", Pin("flake", lock.url))

    def _flake_ref(self, tag: str) -> str | None:
        """The configured flake with `tag` as its ref or rev, if its type has refs."""
        base, _, query = self.config.value.partition("?")
        params = parse_qsl(query, keep_blank_values=True)
        scheme, _, rest = base.partition(":")
        if any(k in ("ref", "rev") for k, _ in params):
            return None  # already pinned
        repo = self._repository()
        if repo is not None:
            if git.is_commit(tag):
                params.append(("rev", tag))
            else:
                # Nix fetches a short ref as a branch; name tags and branches in full.
                found = self._remote_refs(repo).lookup(tag)
                if found is None:
                    raise _unknown(tag, "no branch or tag of that name")
                params += [("ref", found[0]), ("rev", found[1])]
        elif scheme in FLAKE_REF_TYPES and rest.count("/") == 1:
            params.append(("rev" if git.is_commit(tag) else "ref", tag))
        else:
            return None
        return f"{base}?{urlencode(params)}"

    def _content_digest(self, path: str) -> str:
        try:
            return self._fingerprints.digest(path)
        except OSError as exc:
            raise SourceUnavailable(f"cannot read {path}: {exc}") from exc

    def _overlays_digest(self) -> str:
        parts = [f"{p}={self._content_digest(p)}" for p in self.overlays]
        return _digest("\n".join(parts))

    # -- pins -> what Nix imports ------------------------------------------

    def nix_source(self, resolved: ResolvedSource) -> NixSource:
        """What to hand Nix for a pin, fetching it into the store first if needed."""
        pin = resolved.pin
        if pin.kind == "tarball":
            url = pin.location
            return NixSource("path", self._store_path(f"tarball:{url}", lambda: self._fetch(url)))
        if pin.kind == "git":
            repo, commit = self.config.value, pin.location
            key = f"git:{repo}:{commit}"
            return NixSource("path", self._store_path(key, lambda: self._export(commit)))
        return NixSource(pin.kind, pin.location)

    def _store_path(self, key: str, fetch: Callable[[], str]) -> str:
        """The store path fetched for `key`, remembered by a GC root named after it."""
        root = os.path.join(self.config.cache_dir, "roots", _digest(key))

        def get() -> str:
            try:
                target = os.readlink(root)
            except OSError:
                target = ""
            if target.startswith(STORE_DIR) and os.path.exists(target):
                return target
            path = fetch()
            os.makedirs(os.path.dirname(root), exist_ok=True)
            self.nix.add_root(path, root)
            return path

        return self._fetches.do(key, get)

    def _fetch(self, url: str) -> str:
        try:
            return self.nix.fetch_tarball(url, self.fetch_timeout)
        except BuildFailed as exc:
            if "HTTP error 404" in exc.log_tail:
                raise RegistryError(
                    ErrorCode.MANIFEST_UNKNOWN, {"url": url}, "the source tarball does not exist"
                ) from exc
            raise

    def _export(self, commit: str) -> str:
        """Add one commit of the configured repository to the Nix store."""
        repo = self.config.value
        mirror_dir = os.path.join(self.config.cache_dir, "git", _digest(repo) + ".git")
        mirror = git.Mirror(repo, mirror_dir, self.fetch_timeout)
        tmp_root = os.path.join(self.config.cache_dir, "tmp")
        os.makedirs(tmp_root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=tmp_root)
        try:
            tar = os.path.join(tmp, "source.tar")
            with self._mirror_lock:
                if not mirror.ensure(commit):
                    raise RegistryError(
                        ErrorCode.MANIFEST_UNKNOWN,
                        {"commit": commit},
                        "the repository has no such commit",
                    )
                mirror.archive(commit, tar, "source")
            return self.nix.fetch_tarball(Path(tar).as_uri(), self.fetch_timeout)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _read_revision(url: str, timeout: float) -> str | None:
    """The commit a channel's `git-revision` file names; None if there is no such file."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            text: str = response.read(4096).decode("ascii", "replace").strip()
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            return None
        raise SourceUnavailable(f"reading {url}: HTTP {exc.code}") from exc
    except OSError as exc:
        raise SourceUnavailable(f"reading {url}: {exc}") from exc
    if not git.is_commit(text):
        raise SourceUnavailable(f"{url} does not hold a 40-hex commit")
    return text
