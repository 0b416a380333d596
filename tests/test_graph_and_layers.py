from __future__ import annotations

import json

import pytest

from nixery.assembly.layers import LayerGroup, group_layers, path_popularity
from nixery.packages.graph import (
    ClosureGraph,
    StorePath,
    parse_path_info,
    parse_registration,
    store_path_name,
)

S = "/nix/store/"


def graph(
    edges: dict[str, list[str]], roots: list[str], sizes: dict[str, int] | None = None
) -> ClosureGraph:
    sizes = sizes or {}
    paths = {
        S + n: StorePath(S + n, sizes.get(n, 100), tuple(S + r for r in refs))
        for n, refs in edges.items()
    }
    return ClosureGraph(tuple(S + r for r in roots), paths)


def test_parse_path_info_in_both_layouts() -> None:
    entries = [
        {"path": "/nix/store/aaa-b", "narSize": 160,
         "references": ["/nix/store/ccc-a", "/nix/store/aaa-b"]},
        {"path": "/nix/store/ccc-a", "narSize": 120, "references": []},
    ]  # fmt: skip
    listed = parse_path_info(json.dumps(entries))  # Nix up to 2.18
    keyed = parse_path_info(json.dumps({e["path"]: e for e in entries}))  # later
    assert listed == keyed
    assert listed["/nix/store/aaa-b"] == StorePath("/nix/store/aaa-b", 160, ("/nix/store/ccc-a",))
    assert listed["/nix/store/ccc-a"].references == ()


def test_parse_registration() -> None:
    text = "\n".join([
        "/nix/store/aaa-b", "hash", "160", "/nix/store/x.drv", "2",
        "/nix/store/aaa-b", "/nix/store/ccc-a",
        "/nix/store/ccc-a", "hash", "120", "", "0",
    ])  # fmt: skip
    parsed = parse_registration(text)
    assert parsed["/nix/store/aaa-b"] == StorePath("/nix/store/aaa-b", 160, ("/nix/store/ccc-a",))
    assert parsed["/nix/store/ccc-a"].references == ()
    assert store_path_name("/nix/store/aaa-b") == "b"


def test_closure_must_be_closed() -> None:
    with pytest.raises(ValueError):
        graph({"a-x": ["b-y"]}, ["a-x"])


def paths_of(layers: list[LayerGroup]) -> list[tuple[str, ...]]:
    return sorted(layer.paths for layer in layers)


def names(*ns: str) -> tuple[str, ...]:
    return tuple(sorted(S + n for n in ns))


def test_diamond_shared_dependency_is_its_own_layer() -> None:
    # Two requested apps reach glibc through different libraries, so glibc is
    # dominated only by the root and becomes a layer of its own.
    edges = {
        "1-app": ["2-liba"], "2-liba": ["4-glibc"],
        "5-tool": ["3-libb"], "3-libb": ["4-glibc"], "4-glibc": [],
    }  # fmt: skip
    layers = group_layers(graph(edges, ["1-app", "5-tool"]), {}, budget=10)
    assert paths_of(layers) == [
        names("1-app", "2-liba"),
        names("3-libb", "5-tool"),
        names("4-glibc"),
    ]


def test_diamond_under_one_root_is_one_layer() -> None:
    edges = {"1-app": ["2-liba", "3-libb"], "2-liba": ["4-glibc"], "3-libb": ["4-glibc"]}
    edges["4-glibc"] = []
    layers = group_layers(graph(edges, ["1-app"]), {}, budget=10)
    assert paths_of(layers) == [names(*edges)]


def test_shared_deep_dependency_takes_what_only_it_reaches() -> None:
    # Both apps need zlib deep down their chains; zlib's own dependency on the
    # C library is reached only through it, so the two travel together.
    edges = {
        "a-app": ["b-liba"], "b-liba": ["c-libc2"], "c-libc2": ["z-zlib"],
        "d-tool": ["e-libd"], "e-libd": ["z-zlib"],
        "z-zlib": ["g-glibc"], "g-glibc": [],
    }  # fmt: skip
    layers = group_layers(graph(edges, ["a-app", "d-tool"]), {}, budget=10)
    assert paths_of(layers) == [
        names("a-app", "b-liba", "c-libc2"),
        names("d-tool", "e-libd"),
        names("g-glibc", "z-zlib"),
    ]


def test_popular_and_big_paths_get_their_own_layers() -> None:
    edges = {"1-app": ["2-glibc", "3-big"], "2-glibc": [], "3-big": ["4-dep"], "4-dep": []}
    g = graph(edges, ["1-app"], {"3-big": 80, "4-dep": 30})
    # Dominated by the app, but popular: an edge from the root splits it off.
    layers = group_layers(g, {"glibc": 100}, budget=10, big_closure_bytes=10**9)
    assert paths_of(layers) == [names("1-app", "3-big", "4-dep"), names("2-glibc")]
    # Closure of 3-big is 110 bytes: over the threshold, it becomes a layer
    # with the dependency only it reaches; the app's closure counts too.
    layers = group_layers(g, {"glibc": 99}, budget=10, big_closure_bytes=109)
    assert paths_of(layers) == [names("1-app"), names("2-glibc"), names("3-big", "4-dep")]
    # The threshold is a parameter; an equally popular app keeps step 4 out.
    counts = {"glibc": 100, "app": 100}
    layers = group_layers(g, counts, budget=10, popularity_threshold=101)
    assert paths_of(layers) == [names(*edges)]
    layers = group_layers(g, counts, budget=10, popularity_threshold=100)
    assert paths_of(layers) == [names("1-app", "3-big", "4-dep"), names("2-glibc")]


def test_paths_more_popular_than_their_layer_are_split_off() -> None:
    edges = {"1-app": ["2-libssl"], "2-libssl": ["3-zlib"], "3-zlib": []}
    g = graph(edges, ["1-app"], {"1-app": 300, "2-libssl": 200, "3-zlib": 100})
    popularity = {"libssl": 5, "zlib": 9, "app": 1}
    assert paths_of(group_layers(g, popularity, budget=3)) == [
        names("1-app"), names("2-libssl"), names("3-zlib")
    ]  # fmt: skip
    # The split does not depend on the budget: over it, the largest layer
    # stays whole and the others are pooled.
    assert paths_of(group_layers(g, popularity, budget=2)) == [
        names("1-app"), names("2-libssl", "3-zlib")
    ]  # fmt: skip
    # No counts: nothing is known to be shared, so the layer stays whole.
    assert paths_of(group_layers(g, {}, budget=3)) == [names(*edges)]
    # Equally popular: whoever needs the library also needs the app.
    assert paths_of(group_layers(g, {"app": 4, "libssl": 4, "zlib": 4}, budget=3)) == [
        names(*edges)
    ]
    # Only zlib is more popular than the app; libssl stays with the app.
    assert paths_of(group_layers(g, {"app": 4, "libssl": 4, "zlib": 5}, budget=3)) == [
        names("1-app", "2-libssl"), names("3-zlib")
    ]  # fmt: skip


def test_every_budget_from_one_to_beyond_the_candidates() -> None:
    # Ten requested apps with private chains, each also using a shared lib.
    edges: dict[str, list[str]] = {"s-shared": []}
    for i in range(10):
        edges[f"a{i}-app{i}"] = [f"b{i}-lib{i}", "s-shared"]
        edges[f"b{i}-lib{i}"] = []
    roots = [f"a{i}-app{i}" for i in range(10)]
    sizes = {f"a{i}-app{i}": 1000 * (i + 1) for i in range(10)}
    g = graph(edges, roots, sizes)
    popularity = {f"app{i}": 2**i for i in range(10)} | {"shared": 5000}
    unlimited = group_layers(g, popularity, budget=100)
    assert len(unlimited) == 11
    for budget in range(1, 14):
        layers = group_layers(g, popularity, budget=budget)
        assert len(layers) == min(budget, 11)
        assert sorted(p for layer in layers for p in layer.paths) == sorted(g.paths)
        assert all(layer.size == g.total_size(layer.paths) for layer in layers)
        if budget >= 11:
            assert paths_of(layers) == paths_of(unlimited)
        else:
            # The largest candidates stay whole; the rest are pooled.
            whole = sorted(unlimited, key=lambda layer: -layer.size)[: max(budget - 3, 0)]
            assert {layer.paths for layer in whole} <= {layer.paths for layer in layers}


def test_pools_follow_popularity_bands() -> None:
    # Twelve small apps; popularity bands are powers of two: 1, 2-3, 4-7, 8-15.
    edges: dict[str, list[str]] = {f"{i:02d}-app{i}": [] for i in range(1, 13)}
    g = graph(edges, list(edges), {f"{i:02d}-app{i}": 100 + i for i in range(1, 13)})
    popularity = {f"app{i}": i for i in range(1, 13)}
    layers = group_layers(g, popularity, budget=6)
    assert len(layers) == 6
    kept = [layer.paths for layer in layers if len(layer.paths) == 1]
    assert kept == [names("12-app12"), names("11-app11"), names("10-app10")]
    pools = sorted((layer.paths for layer in layers if len(layer.paths) > 1), key=len)
    # The three largest stay whole; of four bands left, the two least popular
    # are joined to fit three pools.
    assert pools == [
        names("08-app8", "09-app9"),
        names("01-app1", "02-app2", "03-app3"),
        names("04-app4", "05-app5", "06-app6", "07-app7"),
    ]


def test_layers_are_ordered_by_rating_highest_first() -> None:
    edges: dict[str, list[str]] = {"1-app": [], "2-lib": [], "3-tool": []}
    g = graph(edges, list(edges), {"1-app": 10, "2-lib": 1000, "3-tool": 10})
    layers = group_layers(g, {"app": 50, "lib": 1, "tool": 50}, budget=10)
    assert [layer.paths for layer in layers] == [names("2-lib"), names("1-app"), names("3-tool")]
    assert [layer.rating for layer in layers] == [1000, 500, 500]


def test_packages_in_every_image_rank_most_popular() -> None:
    edges = {"1-app": ["2-glibc"], "2-glibc": [], "3-nss-cacert": [], "4-iana-etc": []}
    g = graph(edges, ["1-app", "3-nss-cacert", "4-iana-etc"])
    everywhere = {S + "3-nss-cacert", S + "4-iana-etc"}
    layers = group_layers(g, {"glibc": 700}, budget=10, most_popular=everywhere)
    assert [layer.paths for layer in layers[:2]] == [names("3-nss-cacert"), names("4-iana-etc")]
    assert layers[2].paths == names("2-glibc")
    assert path_popularity(g, {"glibc": 700}, everywhere)[S + "3-nss-cacert"] == 701


def test_grouping_is_stable_under_input_order() -> None:
    edges = {f"{i:02d}-p": [f"{j:02d}-p" for j in range(i + 1, min(i + 4, 40))] for i in range(40)}
    popularity = {"p": 1} | {f"{i:02d}": i for i in range(40)}
    g = graph(edges, ["00-p", "07-p", "21-p"], {f"{i:02d}-p": 10 + i % 7 for i in range(40)})
    shuffled = ClosureGraph(
        tuple(reversed(g.roots)),
        {
            p: StorePath(p, info.nar_size, tuple(reversed(info.references)))
            for p, info in reversed(list(g.paths.items()))
        },
    )
    for budget in (1, 3, 8, 94):
        first = group_layers(g, popularity, budget)
        assert first == group_layers(shuffled, popularity, budget)
        assert first == group_layers(g, dict(reversed(popularity.items())), budget)


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError):
        group_layers(graph({"1-a": []}, ["1-a"]), {}, budget=0)


def test_big_closures_are_the_paths_whose_whole_closure_passes_the_threshold() -> None:
    """Checked against the definition (each path's descendants summed) on
    random closures; the implementation stops summing early."""
    import random

    import networkx as nx

    from nixery.assembly.layers import big_closures, dependency_graph

    rng = random.Random(7)
    for n in (1, 30, 200):
        names = [f"{i:04d}-p{i}" for i in range(n)]
        edges = {name: rng.sample(names[:i], min(i, rng.randint(0, 6))) for i, name in
                 enumerate(names)}  # fmt: skip
        sizes = {name: rng.randint(1, 1000) for name in names}
        g = graph(edges, names[-3:], sizes)
        dg = dependency_graph(g)
        for threshold in (0, 500, 5_000, 50_000, g.total_size() - 1, g.total_size()):
            expected = {p for p in g.paths if g.total_size(nx.descendants(dg, p) | {p}) > threshold}
            assert big_closures(g, dg, threshold) == expected
