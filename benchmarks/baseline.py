"""The reference layering, kept exactly as the classic algorithm describes it:
dominator candidates (shared with `nixery.assembly.layers`), then, while over budget,
merge the two layers with the lowest merge rating (popularity of the layer's
root times its size; a merged layer's rating is the sum), and order by
rating, highest first."""

from __future__ import annotations

import heapq
from collections.abc import Collection, Mapping

from nixery.assembly.layers import (
    BIG_CLOSURE_BYTES,
    DEFAULT_BUDGET,
    POPULARITY_THRESHOLD,
    LayerGroup,
    big_closures,
    dependency_graph,
    dominator_layers,
    order_layers,
    path_popularity,
)
from nixery.packages.graph import ClosureGraph


def baseline_group_layers(
    graph: ClosureGraph,
    popularity: Mapping[str, int],
    budget: int = DEFAULT_BUDGET,
    *,
    most_popular: Collection[str] = (),
    popularity_threshold: int = POPULARITY_THRESHOLD,
    big_closure_bytes: int = BIG_CLOSURE_BYTES,
) -> list[LayerGroup]:
    pops = path_popularity(graph, popularity, most_popular, popularity_threshold)
    g = dependency_graph(graph)
    split = set(graph.roots) | {p for p in graph.paths if pops[p] >= popularity_threshold}
    split |= big_closures(graph, g, big_closure_bytes)
    heap = []
    for top, members in dominator_layers(g, split).items():
        paths = tuple(sorted(members))
        size = graph.total_size(paths)
        heap.append((pops[top] * size, paths, size))
    heapq.heapify(heap)
    while len(heap) > budget:
        rating_a, paths_a, size_a = heapq.heappop(heap)
        rating_b, paths_b, size_b = heapq.heappop(heap)
        merged = tuple(sorted(paths_a + paths_b))
        heapq.heappush(heap, (rating_a + rating_b, merged, size_a + size_b))
    return order_layers(LayerGroup(paths, size, rating) for rating, paths, size in heap)


def one_layer_per_path(graph: ClosureGraph, *_: object, **__: object) -> list[LayerGroup]:
    """The ideal for sharing, ignoring the budget."""
    return [LayerGroup((p,), info.nar_size, 0) for p, info in sorted(graph.paths.items())]


def one_layer_per_image(graph: ClosureGraph, *_: object, **__: object) -> list[LayerGroup]:
    return [LayerGroup(tuple(sorted(graph.paths)), graph.total_size(), 0)]
