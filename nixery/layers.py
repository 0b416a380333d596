"""Grouping an image's closure into layers that other images can share.

The closure graph gets a synthetic root with an edge to every requested
package. Store paths that are popular or big also get an edge from the root,
so that they cannot be dominated by anything else and become layers of their
own. In the dominator tree of that graph, each child of the root together
with everything it dominates is one candidate layer: a path dominated by a
child is only reachable through it, so it can ship with it without ever
being needed by an image that lacks the child.

While there are more candidates than the budget allows, the two with the
lowest merge rating (popularity of the layer's root path times the layer's
size) are merged: rarely shared, small layers lose least by merging. Layers
are finally ordered by rating, highest first, because clients reuse layers
only after an unchanged prefix of the layer list.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nixery.graph import ClosureGraph

if TYPE_CHECKING:
    import networkx as nx

ROOT = "<root>"
DEFAULT_BUDGET = 94
POPULARITY_THRESHOLD = 100
BIG_CLOSURE_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class LayerGroup:
    paths: tuple[str, ...]  # sorted store paths
    size: int  # sum of NAR sizes
    rating: int

    def merge(self, other: LayerGroup) -> LayerGroup:
        return LayerGroup(
            tuple(sorted(self.paths + other.paths)),
            self.size + other.size,
            self.rating + other.rating,
        )


def group_layers(
    graph: ClosureGraph,
    popularity: Mapping[str, int],
    budget: int = DEFAULT_BUDGET,
    popularity_threshold: int = POPULARITY_THRESHOLD,
    big_closure: int = BIG_CLOSURE_BYTES,
) -> list[LayerGroup]:
    """Split `graph` into at most `budget` layers, most shareable first."""
    # Imported on first use: networkx is a third of the server's start-up time.
    import networkx as nx

    if budget < 1:
        raise ValueError("the layer budget must be at least 1")
    g = _dependency_graph(graph)
    closure_sizes = {p: graph.total_size(nx.descendants(g, p) | {p}) for p in graph.paths}
    for path, info in graph.paths.items():
        if (
            popularity.get(info.name, 0) >= popularity_threshold
            or closure_sizes[path] > big_closure
        ):
            g.add_edge(ROOT, path)

    dominators = nx.immediate_dominators(g, ROOT)
    tree = nx.DiGraph((idom, node) for node, idom in dominators.items() if node != idom)
    candidates = []
    for top in sorted(tree.successors(ROOT)):
        members = tuple(sorted({top} | nx.descendants(tree, top)))
        size = graph.total_size(members)
        rating = max(popularity.get(graph.paths[top].name, 0), 1) * size
        candidates.append(LayerGroup(members, size, rating))
    return _order(_merge_to_budget(candidates, budget))


def _dependency_graph(graph: ClosureGraph) -> nx.DiGraph:
    import networkx as nx

    g = nx.DiGraph()
    g.add_node(ROOT)
    g.add_nodes_from(graph.paths)
    g.add_edges_from((ROOT, r) for r in graph.roots)
    g.add_edges_from((p.path, ref) for p in graph.paths.values() for ref in p.references)
    return g


def _merge_to_budget(layers: list[LayerGroup], budget: int) -> list[LayerGroup]:
    heap = [(layer.rating, layer.paths, layer) for layer in layers]
    heapq.heapify(heap)
    while len(heap) > budget:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = a.merge(b)
        heapq.heappush(heap, (merged.rating, merged.paths, merged))
    return [entry[2] for entry in heap]


def _order(layers: list[LayerGroup]) -> list[LayerGroup]:
    return sorted(layers, key=lambda layer: (-layer.rating, layer.paths))
