from __future__ import annotations

import pytest

from nixery.graph import ClosureGraph, StorePath, parse_registration, store_path_name
from nixery.layers import group_layers

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


def test_diamond_shared_dependency_is_its_own_layer() -> None:
    # Two requested apps reach glibc through different libraries, so glibc is
    # dominated only by the root and becomes a layer of its own.
    edges = {
        "1-app": ["2-liba"], "2-liba": ["4-glibc"],
        "5-tool": ["3-libb"], "3-libb": ["4-glibc"], "4-glibc": [],
    }  # fmt: skip
    layers = group_layers(graph(edges, ["1-app", "5-tool"]), {}, budget=10)
    assert sorted(layer.paths for layer in layers) == [
        (S + "1-app", S + "2-liba"),
        (S + "3-libb", S + "5-tool"),
        (S + "4-glibc",),
    ]


def test_single_root_dominates_everything() -> None:
    edges = {
        "1-app": ["2-liba", "3-libb"],
        "2-liba": ["4-glibc"],
        "3-libb": ["4-glibc"],
        "4-glibc": [],
    }
    layers = group_layers(graph(edges, ["1-app"]), {}, budget=10)
    assert [layer.paths for layer in layers] == [tuple(sorted(S + n for n in edges))]


def test_every_path_in_exactly_one_layer_and_budget_respected() -> None:
    edges = {f"{i}-p": [f"{j}-p" for j in range(i + 1, min(i + 3, 30))] for i in range(30)}
    g = graph(edges, ["0-p", "5-p", "10-p"])
    for budget in range(1, 8):
        layers = group_layers(g, {"20-p": 1000}, budget=budget)
        assert 1 <= len(layers) <= budget
        members = [p for layer in layers for p in layer.paths]
        assert sorted(members) == sorted(g.paths)


def test_popular_paths_become_layers_and_come_first() -> None:
    g = graph({"1-app": ["2-glibc"], "2-glibc": []}, ["1-app"], {"glibc": 10})
    layers = group_layers(g, {"glibc": 1000}, budget=10)
    assert layers[0].paths == (S + "2-glibc",)


def test_grouping_is_stable() -> None:
    edges = {f"{i}-p": [f"{j}-p" for j in range(i + 1, min(i + 4, 40))] for i in range(40)}
    g = graph(edges, ["0-p", "7-p"])
    assert group_layers(g, {"9-p": 500}, 3) == group_layers(g, {"9-p": 500}, 3)
