"""Popularity data: package name (store path without hash) -> count.

The count is how many packages of a package set have that store path in
their runtime closure; layering uses it to tell widely shared paths from
those only one image wants. The file format is a flat JSON object, the one
the original Nixery publishes for nixpkgs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from nixery.errors import ConfigError
from nixery.packages.graph import ClosureGraph
from nixery.packages.nix import Nix, NixSource, Progress

Popularity = dict[str, int]

MAX_BYTES = 64 * 1024 * 1024


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
