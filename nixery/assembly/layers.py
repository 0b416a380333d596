"""Grouping an image's closure into layers that other images can share.

A client downloads a layer once and reuses it in every image that has a
layer with the same digest, so store paths that many images need should sit
in layers whose content does not depend on what else an image contains, and
an image may have at most `budget` such layers.

0. A closure that fits the budget gets one layer per store path: the
   ideal for sharing, as no grouping can be reused more often. The rest
   applies to closures with more paths than the budget.
1. The closure graph gets a synthetic root with an edge to every requested
   package; every store path has an edge to each of its references.
2. Store paths that are popular (popularity at or above a threshold) or big
   (their closure is larger than a threshold) also get an edge from the
   root, so nothing else can dominate them.
3. In the dominator tree of that graph, each child of the root together with
   everything it dominates is one candidate layer: a path dominated by a
   child is only reachable through it, so it ships with it without ever
   being needed by an image that lacks the child.
4. Layers are split further: a path more popular than the root of its
   layer is wanted by images that lack that root, so it gets an edge from
   the root too (most popular first, as each split changes what the others
   are dominated by). Small package sets, whose counts never reach the
   threshold, get their shared libraries into layers of their own this way.
5. Over budget, the largest candidates stay whole and the rest are pooled by
   popularity band (powers of two; the least popular bands are joined until
   `POOLS` pools remain). With popularity data, the most popular band (the
   paths nearly every image has, and those in every image) is pooled whole
   whatever the size of its paths: that pool comes out the same in most
   images, so it is downloaded once, and the layers kept whole go to paths
   whose sharing depends on the image. A budget too small for the band pools
   and two candidates kept whole (budget < POOLS + 2) gets two pools
   instead: the paths at least half of the package set needs (or, without
   data, half of the closure), pooled whole, and the rest; the layers in
   between go to the largest other candidates, which at such budgets are
   the big shared ones (interpreters, compilers) that a third pool would
   have pushed into the rest. A merged layer is reused only by images that
   happen to produce exactly the same merge, which is rare, so the bytes at
   stake are the bytes pooled: pooling the smallest candidates keeps them
   few, and pooling by a band that does not depend on the image makes the
   pools of widely shared paths come out the same in many images. Splitting
   in step 4 regardless of the budget helps here too: the candidates are
   then the same units in every image, whatever its budget pressure.
6. Layers are ordered by merge rating (popularity of the layer's root times
   its size), highest first, because some clients reuse layers only after
   an unchanged prefix of the layer list.

Without popularity data (none given, or none about any path of this
closure), a path's popularity is how many paths of the closure need it
(itself included): a library many packages of the image use is likely used
by many packages of the set. Such counts differ from image to image, so
they are not used for the pools of step 5: those are the paths most of the
closure needs (and the paths in every image) and the rest, which keeps the
pool of base libraries the same in many images.

Steps 1-3 and 6 are the classic popularity-aware layering, which instead of
4 and 5 merges the two layers with the lowest merge rating until in budget;
`benchmarks/layering.py` measures both against one layer per store path.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nixery.packages.graph import ClosureGraph

if TYPE_CHECKING:
    import networkx as nx

ROOT = "<root>"
# Package layers per image: 125 is the usual limit, and the root file system
# layer plus room for users extending the image come on top.
DEFAULT_BUDGET = 94
POPULARITY_THRESHOLD = 100
BIG_CLOSURE_BYTES = 100 * 1000 * 1000
# Pools of small candidates per image when over budget (see step 5).
POOLS = 3
# Part of every image's cache key: bump it whenever group_layers may return
# other layers for the same closure, popularity data and budget, so that
# images laid out the old way are not served as the new layout's.
LAYERING_VERSION = "3"


@dataclass(frozen=True)
class LayerGroup:
    paths: tuple[str, ...]  # sorted store paths
    size: int  # sum of NAR sizes
    rating: int  # popularity times size; higher comes first


def path_popularity(
    graph: ClosureGraph,
    popularity: Mapping[str, int],
    most_popular: Collection[str] = (),
    popularity_threshold: int = POPULARITY_THRESHOLD,
) -> dict[str, int]:
    """Every path's popularity: its name's count (at least 1); the paths in
    `most_popular` (in every image) rank above everything else."""
    top = max([popularity_threshold - 1, *popularity.values()]) + 1
    return {
        path: top if path in most_popular else max(popularity.get(info.name, 0), 1)
        for path, info in graph.paths.items()
    }


def group_layers(
    graph: ClosureGraph,
    popularity: Mapping[str, int],
    budget: int = DEFAULT_BUDGET,
    *,
    most_popular: Collection[str] = (),
    popularity_threshold: int = POPULARITY_THRESHOLD,
    big_closure_bytes: int = BIG_CLOSURE_BYTES,
) -> list[LayerGroup]:
    """Split `graph` into at most `budget` layers, most shareable first."""
    if budget < 1:
        raise ValueError("the layer budget must be at least 1")
    g = dependency_graph(graph)
    known = any(info.name in popularity for info in graph.paths.values())
    small = budget < POOLS + 2  # the band pools would leave one candidate whole
    if known:
        pops = path_popularity(graph, popularity, most_popular, popularity_threshold)
        if small:
            bands = _halves(graph, pops, max(popularity.values()), most_popular)
        else:
            bands = {p: pop.bit_length() for p, pop in pops.items()}
    else:
        pops = closure_popularity(graph, g, most_popular)
        bands = _halves(graph, pops, len(graph.paths), most_popular)
    if len(graph.paths) <= budget:
        return order_layers(
            LayerGroup((p,), info.nar_size, pops[p] * info.nar_size)
            for p, info in graph.paths.items()
        )
    popular = {p for p in graph.paths if pops[p] >= popularity_threshold}
    split = set(graph.roots) | popular | big_closures(graph, g, big_closure_bytes)
    tops = _split_shared(g, split, dominator_layers(g, split), pops)
    return order_layers(_pool(graph, tops, pops, bands, budget, pool_top=known or small))


def closure_popularity(
    graph: ClosureGraph, g: nx.DiGraph, most_popular: Collection[str] = ()
) -> dict[str, int]:
    """Every path's popularity within its own closure: how many of the
    closure's paths need it, itself included; the paths in `most_popular`
    rank above everything else."""
    import networkx as nx

    try:  # referrers first: each path's needers are its referrers' and theirs
        order = [p for p in nx.topological_sort(g) if p != ROOT]
    except nx.NetworkXUnfeasible:  # a cycle: count each path's ancestors directly
        counts = {p: len(nx.ancestors(g, p) - {ROOT}) + 1 for p in graph.paths}
    else:
        bit = {p: 1 << i for i, p in enumerate(order)}
        needers = dict.fromkeys(order, 0)
        for p in order:
            for ref in g.successors(p):
                needers[ref] |= needers[p] | bit[p]
        counts = {p: needers[p].bit_count() + 1 for p in order}
    top = max(counts.values(), default=0) + 1
    return {p: top if p in most_popular else count for p, count in counts.items()}


def _halves(
    graph: ClosureGraph, pops: Mapping[str, int], whole: int, most_popular: Collection[str]
) -> dict[str, int]:
    """Two pooling bands: the paths at least half of `whole` need (the
    package set's packages, or without data the closure's paths: base
    libraries, much the same in every image) and the paths in every image,
    then the rest."""
    half = (whole + 1) // 2
    return {p: int(p in most_popular or pops[p] >= half) for p in graph.paths}


def dependency_graph(graph: ClosureGraph) -> nx.DiGraph:
    """Store paths with an edge to each reference, and ROOT to the roots."""
    # Imported on first use: networkx is a third of the server's start-up time.
    import networkx as nx

    g = nx.DiGraph()
    g.add_node(ROOT)
    g.add_nodes_from(sorted(graph.paths))
    g.add_edges_from((ROOT, r) for r in graph.roots)
    g.add_edges_from(
        (p.path, ref) for p in graph.paths.values() for ref in p.references if ref != p.path
    )
    return g


def big_closures(graph: ClosureGraph, g: nx.DiGraph, threshold: int) -> set[str]:
    """Paths whose runtime closure is larger than `threshold` bytes."""
    import networkx as nx

    if graph.total_size() <= threshold:
        return set()  # no closure can be bigger than the whole image
    try:  # dependencies first, so that most paths are settled by a reference
        order = list(reversed(list(nx.topological_sort(g))))
    except nx.NetworkXUnfeasible:  # a cycle: still correct, only slower
        order = sorted(g)
    big: set[str] = set()
    for path in order:
        if path == ROOT:
            continue
        # A closure holds its references' closures: one big reference settles
        # it; otherwise it is summed only until the threshold is passed, so
        # no path's whole closure is walked (that was quadratic in paths).
        if any(ref in big for ref in g.successors(path)) or _exceeds(graph, g, path, threshold):
            big.add(path)
    return big


def _exceeds(graph: ClosureGraph, g: nx.DiGraph, path: str, threshold: int) -> bool:
    """Whether the closure of `path` is bigger than `threshold` bytes."""
    seen = {path}
    stack = [path]
    total = 0
    while stack:
        node = stack.pop()
        total += graph.paths[node].nar_size
        if total > threshold:
            return True
        for ref in g.successors(node):
            if ref not in seen:
                seen.add(ref)
                stack.append(ref)
    return False


def dominator_layers(g: nx.DiGraph, split: Collection[str]) -> dict[str, set[str]]:
    """Children of ROOT in the dominator tree once ROOT also points at every
    path in `split`, each with the paths it dominates."""
    import networkx as nx

    added = [(ROOT, p) for p in split if not g.has_edge(ROOT, p)]
    g.add_edges_from(added)  # for this computation only: copying g costs more
    try:
        idom = nx.immediate_dominators(g, ROOT)
    finally:
        g.remove_edges_from(added)
    top: dict[str, str] = {}

    def top_of(node: str) -> str:
        chain = []
        while node not in top and idom[node] != ROOT:
            chain.append(node)
            node = idom[node]
        found = top.get(node, node)
        for n in chain:
            top[n] = found
        top[node] = found
        return found

    layers: dict[str, set[str]] = {}
    for node in sorted(idom):
        if node != ROOT:
            layers.setdefault(top_of(node), set()).add(node)
    return layers


def _split_shared(
    g: nx.DiGraph, split: set[str], tops: dict[str, set[str]], pops: Mapping[str, int]
) -> dict[str, set[str]]:
    """Give paths more popular than their layer's root layers of their own."""
    split = set(split)
    levels = sorted({pops[p] for p in g if p != ROOT and p not in split}, reverse=True)
    for level in levels:
        wanted = {
            p
            for top, members in tops.items()
            for p in members
            if pops[p] == level and p != top and level > pops[top]
        }
        if wanted:
            split |= wanted
            tops = dominator_layers(g, split)
    return tops


def _pool(
    graph: ClosureGraph,
    tops: Mapping[str, set[str]],
    pops: Mapping[str, int],
    bands: Mapping[str, int],
    budget: int,
    pool_top: bool = False,
) -> list[LayerGroup]:
    """Keep the largest candidates whole; pool the rest by band (a higher
    band holds more popular paths). With `pool_top`, candidates of the top
    band are the last to be kept whole, so they are pooled together."""
    top_band = max(bands.values(), default=0)
    units = sorted(
        ((graph.total_size(members), tuple(sorted(members)), top) for top, members in tops.items()),
        key=lambda unit: (pool_top and bands[unit[2]] == top_band, -unit[0], unit[1]),
    )
    if len(units) <= budget:
        keep = len(units)
    else:
        keep = budget - min(POOLS, budget - 1) if budget > 1 else 0
        # Fewer bands than pools among the rest leave room to keep more.
        while keep < len(units) and keep + 1 + _band_count(units[keep + 1 :], bands) <= budget:
            keep += 1
    layers = [LayerGroup(paths, size, pops[top] * size) for size, paths, top in units[:keep]]
    pooled: dict[int, list[tuple[int, tuple[str, ...], str]]] = {}
    for unit in units[keep:]:
        pooled.setdefault(bands[unit[2]], []).append(unit)
    pools = [pooled[band] for band in sorted(pooled, reverse=True)]
    while len(layers) + len(pools) > budget:
        last = pools.pop()
        pools[-1] = pools[-1] + last  # join the two least popular bands
    for pool in pools:
        paths = tuple(sorted(p for _, members, _ in pool for p in members))
        size = sum(size for size, _, _ in pool)
        top = max(pool, key=lambda unit: (pops[unit[2]], unit[0], unit[1]))[2]
        layers.append(LayerGroup(paths, size, pops[top] * size))
    return layers


def _band_count(units: list[tuple[int, tuple[str, ...], str]], bands: Mapping[str, int]) -> int:
    return min(POOLS, len({bands[top] for _, _, top in units}))


def order_layers(layers: Iterable[LayerGroup]) -> list[LayerGroup]:
    """Highest rating first; ties in path order, so the result is stable."""
    return sorted(layers, key=lambda layer: (-layer.rating, layer.paths))
