from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# One NAR hash as Nix 2.8 registers it (base 16) and as newer Nix does
# (`sha256:` and Nix's base 32), converted with `nix-hash --to-base32`.
NAR_HEX = "5665ce23a8f7127ccf74fef0b5efafec6228652eb735701cc2f43c70d4f11a58"
NAR_NIX32 = "sha256:0n0sy7a70g7lq8f70ddp5rjjhqpcmzpvbw7yfk7pq4ppm0iwwran"


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
        "/nix/store/aaa-b", NAR_HEX, "160", "/nix/store/x.drv", "2",
        "/nix/store/aaa-b", "/nix/store/ccc-a",
        "/nix/store/ccc-a", NAR_NIX32, "120", "", "0",
    ])  # fmt: skip
    parsed = parse_registration(text)
    assert parsed["/nix/store/aaa-b"] == StorePath(
        "/nix/store/aaa-b", 160, ("/nix/store/ccc-a",), NAR_HEX
    )
    assert parsed["/nix/store/ccc-a"].references == ()
    assert parsed["/nix/store/ccc-a"].nar_hash == NAR_HEX
    assert store_path_name("/nix/store/aaa-b") == "b"
    with pytest.raises(ValueError):
        parse_registration(text.replace(NAR_HEX, "md5:abc"))


def test_closure_must_be_closed() -> None:
    with pytest.raises(ValueError):
        graph({"a-x": ["b-y"]}, ["a-x"])


def flat(edges: dict[str, list[str]]) -> dict[str, int]:
    """Popularity data that tells no path apart: dominators alone group."""
    return {n.split("-", 1)[1]: 1 for n in edges}


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
    layers = group_layers(graph(edges, ["1-app", "5-tool"]), flat(edges), budget=3)
    assert paths_of(layers) == [
        names("1-app", "2-liba"),
        names("3-libb", "5-tool"),
        names("4-glibc"),
    ]


def test_diamond_under_one_root_is_one_layer() -> None:
    edges = {"1-app": ["2-liba", "3-libb"], "2-liba": ["4-glibc"], "3-libb": ["4-glibc"]}
    edges["4-glibc"] = []
    layers = group_layers(graph(edges, ["1-app"]), flat(edges), budget=3)
    assert paths_of(layers) == [names(*edges)]


def test_shared_deep_dependency_takes_what_only_it_reaches() -> None:
    # Both apps need zlib deep down their chains; zlib's own dependency on the
    # C library is reached only through it, so the two travel together.
    edges = {
        "a-app": ["b-liba"], "b-liba": ["c-libc2"], "c-libc2": ["z-zlib"],
        "d-tool": ["e-libd"], "e-libd": ["z-zlib"],
        "z-zlib": ["g-glibc"], "g-glibc": [],
    }  # fmt: skip
    layers = group_layers(graph(edges, ["a-app", "d-tool"]), flat(edges), budget=3)
    assert paths_of(layers) == [
        names("a-app", "b-liba", "c-libc2"),
        names("d-tool", "e-libd"),
        names("g-glibc", "z-zlib"),
    ]


def test_popular_and_big_paths_get_their_own_layers() -> None:
    edges = {"1-app": ["2-glibc", "3-big"], "2-glibc": [], "3-big": ["4-dep"], "4-dep": []}
    g = graph(edges, ["1-app"], {"3-big": 80, "4-dep": 30})
    # Dominated by the app, but popular: an edge from the root splits it off.
    layers = group_layers(g, {"glibc": 100}, budget=3, big_closure_bytes=10**9)
    assert paths_of(layers) == [names("1-app", "3-big", "4-dep"), names("2-glibc")]
    # Closure of 3-big is 110 bytes: over the threshold, it becomes a layer
    # with the dependency only it reaches; the app's closure counts too.
    layers = group_layers(g, {"glibc": 99}, budget=3, big_closure_bytes=109)
    assert paths_of(layers) == [names("1-app"), names("2-glibc"), names("3-big", "4-dep")]
    # The threshold is a parameter; an equally popular app keeps step 4 out.
    counts = {"glibc": 100, "app": 100}
    layers = group_layers(g, counts, budget=3, popularity_threshold=101)
    assert paths_of(layers) == [names(*edges)]
    layers = group_layers(g, counts, budget=3, popularity_threshold=100)
    assert paths_of(layers) == [names("1-app", "3-big", "4-dep"), names("2-glibc")]


def test_paths_more_popular_than_their_layer_are_split_off() -> None:
    edges = {"1-app": ["2-libssl"], "2-libssl": ["3-zlib"], "3-zlib": [], "4-tool": []}
    sizes = {"1-app": 300, "2-libssl": 200, "3-zlib": 100, "4-tool": 50}
    g = graph(edges, ["1-app", "4-tool"], sizes)
    popularity = {"libssl": 5, "zlib": 9, "app": 1, "tool": 1}
    # Four candidates for three layers, a budget too small for the band
    # pools: the two at least half of the set needs (libssl 5 and zlib 9 of
    # 9) share a pool, the largest other stays whole, the rest is pooled.
    assert paths_of(group_layers(g, popularity, budget=3)) == [
        names("1-app"), names("2-libssl", "3-zlib"), names("4-tool")
    ]  # fmt: skip
    # The split does not depend on the budget: over it, the largest layer
    # stays whole and the others are pooled.
    assert paths_of(group_layers(g, popularity, budget=2)) == [
        names("1-app"), names("2-libssl", "3-zlib", "4-tool")
    ]  # fmt: skip
    # Equally popular: whoever needs the library also needs the app.
    even = {"app": 4, "libssl": 4, "zlib": 4, "tool": 4}
    assert paths_of(group_layers(g, even, budget=3)) == [
        names("1-app", "2-libssl", "3-zlib"), names("4-tool")
    ]  # fmt: skip
    # Only zlib is more popular than the app; libssl stays with the app.
    assert paths_of(group_layers(g, even | {"zlib": 5}, budget=3)) == [
        names("1-app", "2-libssl"), names("3-zlib"), names("4-tool")
    ]  # fmt: skip
    # No counts: a path is as popular as the paths of the closure needing
    # it, so zlib (three) and libssl (two) are split off the app (one); the
    # two that half of the closure needs share a pool.
    assert paths_of(group_layers(g, {}, budget=3)) == [
        names("1-app"), names("2-libssl", "3-zlib"), names("4-tool")
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
    candidates = group_layers(g, popularity, budget=20)  # one fewer than the paths
    assert len(candidates) == 11
    for budget in range(1, 23):
        layers = group_layers(g, popularity, budget=budget)
        assert len(layers) == (21 if budget >= 21 else min(budget, 11))
        assert sorted(p for layer in layers for p in layer.paths) == sorted(g.paths)
        assert all(layer.size == g.total_size(layer.paths) for layer in layers)
        if budget >= 21:
            assert paths_of(layers) == [(p,) for p in sorted(g.paths)]
        elif budget >= 11:
            assert paths_of(layers) == paths_of(candidates)
        else:
            # The largest candidates stay whole; the rest are pooled.
            whole = sorted(candidates, key=lambda layer: -layer.size)[: max(budget - 3, 0)]
            assert {layer.paths for layer in whole} <= {layer.paths for layer in layers}


def test_pools_follow_popularity_bands() -> None:
    # Twelve small apps; popularity bands are powers of two: 1, 2-3, 4-7, 8-15.
    edges: dict[str, list[str]] = {f"{i:02d}-app{i}": [] for i in range(1, 13)}
    g = graph(edges, list(edges), {f"{i:02d}-app{i}": 100 + i for i in range(1, 13)})
    popularity = {f"app{i}": i for i in range(1, 13)}
    layers = group_layers(g, popularity, budget=6)
    assert sorted(layer.paths for layer in layers) == [
        # The most popular band (8-15) is pooled whole whatever its sizes.
        names("01-app1", "02-app2", "03-app3"),
        names("04-app4"),
        names("05-app5"),
        names("06-app6"),
        names("07-app7"),
        names("08-app8", "09-app9", "10-app10", "11-app11", "12-app12"),
    ]
    # Of the rest, the three largest stay whole (5-7); app4 is its band's
    # pool, and the two least popular bands (1, 2-3) are joined to fit.
    assert [layer.paths for layer in layers][0] == names(
        "08-app8", "09-app9", "10-app10", "11-app11", "12-app12"
    )  # the highest rating comes first
    # Without data about them the apps are equally popular: the largest stay
    # whole and the rest share one pool.
    layers = group_layers(g, {}, budget=6)
    assert sorted(layer.paths for layer in layers) == [
        names("01-app1", "02-app2", "03-app3", "04-app4", "05-app5", "06-app6", "07-app7"),
        names("08-app8"),
        names("09-app9"),
        names("10-app10"),
        names("11-app11"),
        names("12-app12"),
    ]


def test_a_budget_too_small_for_the_band_pools_keeps_two_pools() -> None:
    # Budget 4 < POOLS + 2: the paths at least half of the set needs (here
    # popularity 6-12 of 12) are one pool, the largest two others stay whole.
    edges: dict[str, list[str]] = {f"{i:02d}-app{i}": [] for i in range(1, 13)}
    sizes = {f"{i:02d}-app{i}": 100 + i for i in range(1, 13)} | {"01-app1": 500}
    g = graph(edges, list(edges), sizes)
    popularity = {f"app{i}": i for i in range(1, 13)}
    layers = group_layers(g, popularity, budget=4)
    assert sorted(layer.paths for layer in layers) == [
        names("01-app1"),
        names("02-app2", "03-app3", "04-app4"),
        names("05-app5"),
        names(*(f"{i:02d}-app{i}" for i in range(6, 13))),
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


@st.composite
def closures(draw: st.DrawFn, max_paths: int = 40) -> ClosureGraph:
    """A random closure: each path refers to some of the paths before it."""
    n = draw(st.integers(1, max_paths))
    edges = {
        f"{i:03d}-p{i % 7}": [f"{j:03d}-p{j % 7}" for j in draw(st.sets(st.integers(0, i - 1)))]
        if i
        else []
        for i in range(n)
    }
    sizes = {name: draw(st.integers(1, 10**6)) for name in edges}
    # Every path is needed: the unreferenced ones are requested, and some more.
    referenced = {ref for refs in edges.values() for ref in refs}
    roots = {name for name in edges if name not in referenced}
    roots |= draw(st.sets(st.sampled_from(sorted(edges)), max_size=3))
    return graph(edges, sorted(roots), sizes)


@settings(max_examples=60, deadline=None)
@given(closures(), st.integers(0, 30), st.booleans())
def test_a_closure_within_the_budget_gets_one_layer_per_path(
    g: ClosureGraph, spare: int, with_data: bool
) -> None:
    # With popularity data about every name, and without any: both ways
    # each path is a layer of its own, in an order that does not depend on
    # how the closure was listed.
    popularity = {f"p{i}": 10 * i for i in range(7)} if with_data else {}
    layers = group_layers(g, popularity, budget=len(g.paths) + spare)
    assert len(layers) == len(g.paths)
    assert paths_of(layers) == [(p,) for p in sorted(g.paths)]
    assert all(layer.size == g.paths[layer.paths[0]].nar_size for layer in layers)
    reordered = ClosureGraph(g.roots, dict(reversed(list(g.paths.items()))))
    assert group_layers(reordered, popularity, budget=len(g.paths) + spare) == layers


@settings(max_examples=60, deadline=None)
@given(closures(max_paths=60), st.integers(1, 12), st.booleans())
def test_a_closure_over_the_budget_fills_it_with_every_path_once(
    g: ClosureGraph, budget: int, with_data: bool
) -> None:
    popularity = {f"p{i}": 10 * i for i in range(7)} if with_data else {}
    layers = group_layers(g, popularity, budget=budget)
    assert 1 <= len(layers) <= budget
    assert sorted(p for layer in layers for p in layer.paths) == sorted(g.paths)


@settings(max_examples=40, deadline=None)
@given(closures(max_paths=60))
def test_closure_popularity_counts_the_paths_needing_each_path(g: ClosureGraph) -> None:
    """Checked against the definition: each path's ancestors, plus itself."""
    import networkx as nx

    from nixery.assembly.layers import ROOT, closure_popularity, dependency_graph

    dg = dependency_graph(g)
    counts = closure_popularity(g, dg)
    assert counts == {p: len(nx.ancestors(dg, p) - {ROOT}) + 1 for p in g.paths}
    everywhere = {sorted(g.paths)[0]}
    ranked = closure_popularity(g, dg, everywhere)
    assert ranked[sorted(g.paths)[0]] == max(counts.values()) + 1


def test_without_data_grouping_is_stable_under_input_order() -> None:
    edges = {f"{i:02d}-p": [f"{j:02d}-p" for j in range(i + 1, min(i + 4, 40))] for i in range(40)}
    g = graph(edges, ["00-p", "07-p", "21-p"], {f"{i:02d}-p": 10 + i % 7 for i in range(40)})
    shuffled = ClosureGraph(
        tuple(reversed(g.roots)),
        {
            p: StorePath(p, info.nar_size, tuple(reversed(info.references)))
            for p, info in reversed(list(g.paths.items()))
        },
    )
    for budget in (1, 3, 8, 39, 40, 94):
        first = group_layers(g, {}, budget)
        assert len(first) == (40 if budget >= 40 else budget)
        assert first == group_layers(shuffled, {}, budget)
        # Data about names outside the closure is no data about it.
        assert first == group_layers(g, {"unrelated": 7}, budget)
