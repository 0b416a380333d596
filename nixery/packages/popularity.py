"""Popularity data: package name (store path without hash) -> count.

The count is how many packages of a package set have that store path in
their runtime closure; layering uses it to tell widely shared paths from
those only one image wants. The file format is a flat JSON object, the one
the original Nixery publishes for nixpkgs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from nixery.errors import ConfigError
from nixery.packages.graph import ClosureGraph
from nixery.packages.nix import Nix, NixSource, Progress
from nixery.singleflight import SingleFlight

log = logging.getLogger(__name__)

Popularity = dict[str, int]

MAX_BYTES = 64 * 1024 * 1024
# A `--popularity` URL naming these is a template, fetched per package set.
PLACEHOLDERS = ("{channel}", "{revision}")
RETRY_AFTER = 300.0  # seconds before a revision whose data could not be fetched is tried again
MAX_REVISIONS = 16  # revisions whose data is kept in memory


def load_popularity(source: str, timeout: float = 30.0) -> Popularity:
    """Read popularity data from a file path or an http(s) URL."""
    if "://" in source and not source.startswith(("http://", "https://")):
        raise ConfigError(f"popularity source {source}: only http(s) URLs and files are supported")
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=timeout) as response:  # noqa: S310
                raw = response.read(MAX_BYTES + 1)
        else:
            with open(source, "rb") as fh:
                raw = fh.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"cannot fetch popularity data from {source}: HTTP {exc.code}") from exc
    except urllib.error.URLError as exc:
        raise ConfigError(f"cannot fetch popularity data from {source}: {exc.reason}") from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot read popularity data from {source}: {reason}") from exc
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"popularity data from {source} is larger than {MAX_BYTES} bytes")
    return parse_popularity(raw, source)


def parse_popularity(raw: bytes, origin: str = "popularity data") -> Popularity:
    """Validate a JSON object of name -> non-negative integer count."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"popularity data from {origin} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"popularity data from {origin} must be a JSON object of name -> count,"
            f" not {type(data).__name__}"
        )
    bad = sorted(
        name
        for name, count in data.items()
        if not name or not isinstance(count, int) or isinstance(count, bool) or count < 0
    )
    if bad:
        shown = ", ".join(repr(name) for name in bad[:5])
        raise ConfigError(
            f"popularity data from {origin}: counts must be non-negative integers"
            f" and names non-empty; bad entries: {shown}"
        )
    return {str(name): int(count) for name, count in data.items()}


def count_popularity(graph: ClosureGraph) -> Popularity:
    """For every store path name, how many of `graph.roots` need it at run time."""
    import networkx as nx  # not at start-up: the server loads this module

    g = nx.DiGraph()
    g.add_nodes_from(graph.paths)
    g.add_edges_from((p.path, ref) for p in graph.paths.values() for ref in p.references)
    counts: Counter[str] = Counter()
    for root in graph.roots:
        closure = nx.descendants(g, root) | {root}
        counts.update({graph.paths[p].name for p in closure})
    return dict(sorted(counts.items()))


def dump_popularity(popularity: Popularity) -> str:
    return json.dumps(popularity, indent=1, sort_keys=True) + "\n"


@dataclass(frozen=True)
class PopCount:
    popularity: Popularity
    packages: int  # distinct packages counted
    skipped: tuple[str, ...]  # attributes that did not build


def popcount(
    nix: Nix,
    source: NixSource,
    system: str,
    overlays: Sequence[str] = (),
    progress: Progress | None = None,
) -> PopCount:
    """Popularity data for a whole package set, from the closures Nix reports."""
    closure = nix.package_set_closure(source, system, overlays, progress)
    return PopCount(count_popularity(closure.graph), len(closure.graph.roots), closure.skipped)


def is_template(source: str) -> bool:
    return any(p in source for p in PLACEHOLDERS)


def popularity_digest(popularity: Mapping[str, int]) -> str:
    """What identifies the data in cache keys: equal data, equal digest."""
    canonical = json.dumps(sorted(popularity.items()), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Counts:
    """Popularity data as used for one build, with its digest."""

    popularity: Mapping[str, int]
    digest: str

    @staticmethod
    def of(popularity: Mapping[str, int]) -> Counts:
        return Counts(dict(popularity), popularity_digest(popularity))


NO_DATA = Counts({}, popularity_digest({}))


class FixedPopularity:
    """The same popularity data for every package set revision."""

    def __init__(self, popularity: Mapping[str, int]) -> None:
        self.fixed = Counts.of(popularity)

    def counts(self, channel: str | None, revision: str) -> Counts:
        return self.fixed


class PopularityByRevision:
    """Popularity data from a URL (or file) template naming `{channel}` and/or
    `{revision}` (the package set's commit), fetched once per revision and
    kept on disk, so restarts and other replicas sharing the directory need
    not fetch it again. The data is optional: when it cannot be fetched (or
    the package source has no channel or commit to fill in), images are laid
    out without it and the failure is logged; a failed fetch is tried again
    after `retry_after` seconds."""

    def __init__(
        self,
        template: str,
        cache_dir: str,
        timeout: float = 30.0,
        retry_after: float = RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.template = template
        self.cache_dir = os.path.join(cache_dir, "popularity")
        self.timeout = timeout
        self.retry_after = retry_after
        self.clock = clock
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, Counts] = OrderedDict()
        self._failed: dict[str, float] = {}  # url -> when it last failed
        self._flight: SingleFlight[Counts] = SingleFlight()
        self.fetches = 0  # observable by tests

    def url(self, channel: str | None, revision: str) -> str | None:
        """The template filled in for a package set; None if it names a
        placeholder this source has no value for."""
        commit = revision.removeprefix("commit:").split("+", 1)[0]
        values = {
            "{channel}": channel,
            "{revision}": commit if revision.startswith("commit:") else None,
        }
        url = self.template
        for placeholder, value in values.items():
            if placeholder in url:
                if value is None:
                    return None
                url = url.replace(placeholder, urllib.parse.quote(value, safe=""))
        return url

    def counts(self, channel: str | None, revision: str) -> Counts:
        url = self.url(channel, revision)
        if url is None:
            return NO_DATA
        with self._lock:
            if url in self._loaded:
                self._loaded.move_to_end(url)
                return self._loaded[url]
            failed = self._failed.get(url)
            if failed is not None and self.clock() - failed < self.retry_after:
                return NO_DATA
        # One fetch per revision, also when many builds ask at once; lookups
        # of other revisions do not wait for it.
        return self._flight.do(url, lambda: self._load(url))

    def _load(self, url: str) -> Counts:
        counts = self._read_cached(url) or self._fetch(url)
        with self._lock:
            if counts is None:
                self._failed[url] = self.clock()
                return NO_DATA
            self._failed.pop(url, None)
            self._loaded[url] = counts
            while len(self._loaded) > MAX_REVISIONS:
                self._loaded.popitem(last=False)
            return counts

    def _cache_file(self, url: str) -> str:
        return os.path.join(self.cache_dir, hashlib.sha256(url.encode()).hexdigest() + ".json")

    def _read_cached(self, url: str) -> Counts | None:
        try:
            with open(self._cache_file(url), "rb") as fh:
                return Counts.of(parse_popularity(fh.read(), self._cache_file(url)))
        except FileNotFoundError:
            return None
        except (OSError, ConfigError) as exc:  # unreadable: fetch it again
            log.warning("ignoring cached popularity data for %s: %s", url, exc)
            return None

    def _fetch(self, url: str) -> Counts | None:
        self.fetches += 1
        try:
            popularity = load_popularity(url, self.timeout)
        except ConfigError as exc:
            log.warning("laying out images without popularity data: %s", exc)
            return None
        log.info("popularity data for %d names from %s", len(popularity), url)
        try:
            self._write_cached(url, popularity)
        except OSError as exc:  # the data is still used; only the next start fetches again
            log.warning("cannot keep popularity data from %s on disk: %s", url, exc)
        return Counts.of(popularity)

    def _write_cached(self, url: str, popularity: Popularity) -> None:
        """Write whole or not at all: another replica may read it at any time."""
        os.makedirs(self.cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(dump_popularity(popularity))
            os.replace(tmp, self._cache_file(url))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
