"""Looking names up in the package set, for people: does a name resolve,
what is it, and what did they probably mean.

Answers come from Nix (`Nix.describe`) and are cached for a few minutes per
package set revision, so a busy front page or a run of typos does not start
an evaluation each time.
"""

from __future__ import annotations

import difflib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachetools import TTLCache

from nixery.packages.names import attribute_name, image_component
from nixery.packages.nix import Nix, NixSource, PackageInfo

CACHE_SECONDS = 300.0
MAX_SUGGESTIONS = 3
SIMILARITY_CUTOFF = 0.6
# Suggestions ride on a 404: listing the names must not hold the answer up long.
LIST_TIMEOUT = 20.0


@dataclass(frozen=True)
class Lookup:
    query: str
    info: PackageInfo | None  # None: the name does not resolve
    suggestions: tuple[str, ...]  # attribute names, closest first
    refused: str | None = None  # Nix's reason, for a name that exists but does not evaluate

    @property
    def found(self) -> bool:
        return self.info is not None

    @property
    def present(self) -> bool:
        """In the package set, whether or not it evaluates."""
        return self.info is not None or self.refused is not None

    @property
    def image_name(self) -> str | None:
        """The name to pull, if the package can be named in an image."""
        return image_component(self.info.attr_path) if self.info else None


class _Names:
    """A package set's top-level attribute names, indexed for fuzzy matching."""

    def __init__(self, names: Sequence[str]):
        self.by_lower: dict[str, str] = {}
        for name in sorted(names):
            self.by_lower.setdefault(name.lower(), name)
        self.lowered = list(self.by_lower)

    def close_to(self, name: str) -> list[str]:
        head = name.split(".", 1)[0].lower()
        if head in self.by_lower:
            return []  # the set exists; the miss is deeper than we index
        matches = difflib.get_close_matches(
            head, self.lowered, n=MAX_SUGGESTIONS, cutoff=SIMILARITY_CUTOFF
        )
        return [self.by_lower[m] for m in matches]


class Catalog:
    def __init__(
        self,
        nix: Nix,
        overlays: Sequence[str] = (),
        ttl: float = CACHE_SECONDS,
        list_timeout: float = LIST_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nix = nix
        self.overlays = tuple(overlays)
        self.list_timeout = list_timeout
        self._lock = threading.Lock()
        self._lookups: TTLCache[tuple[str, str, str], Lookup] = TTLCache(4096, ttl, clock)
        self._names: TTLCache[tuple[str, str], _Names] = TTLCache(16, ttl, clock)

    def lookup(self, source: NixSource, revision: str, system: str, query: str) -> Lookup:
        """What `query` (as typed in an image name) means in the package set
        `source`, whose content `revision` names (the cache key)."""
        key = (revision, system, query)
        with self._lock:
            cached = self._lookups.get(key)
        if cached is not None:
            return cached
        names = self._cached_names(revision, system)
        found, refused, attributes = self.nix.describe(
            source, system, [attribute_name(query)], self.overlays, names is None
        )
        if attributes is not None:
            names = self._remember_names(revision, system, attributes)
        assert names is not None
        info = found[0] if found else None
        if refused:
            reason = self.nix.refusal(source, system, refused[0], self.overlays)
            result = Lookup(query, None, (), refused=reason)
        else:
            result = Lookup(query, info, () if info else tuple(names.close_to(query)))
        with self._lock:
            self._lookups[key] = result
        return result

    def suggest(self, source: NixSource, revision: str, system: str, query: str) -> list[str]:
        """Attribute names close to `query`, closest first: from the set's
        names alone (nothing is built), within LIST_TIMEOUT."""
        names = self._cached_names(revision, system)
        if names is None:
            attributes = self.nix.describe(
                source, system, [], self.overlays, True, timeout=self.list_timeout
            ).attributes
            names = self._remember_names(revision, system, attributes or [])
        return names.close_to(attribute_name(query))

    def _cached_names(self, revision: str, system: str) -> _Names | None:
        with self._lock:
            return self._names.get((revision, system))

    def _remember_names(self, revision: str, system: str, attributes: Sequence[str]) -> _Names:
        names = _Names(attributes)
        with self._lock:
            self._names[(revision, system)] = names
        return names
