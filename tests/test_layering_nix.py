"""Layering on real closures from Nix and the fixture package set."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from nixery.assembly.archive import GZIP, Compression, Output, write_store_layer
from nixery.assembly.layers import LayerGroup, group_layers, path_popularity
from nixery.errors import BuildNotAllowed
from nixery.images import queue as queue_module
from nixery.images.model import BuildSettings, BuiltImage
from nixery.images.service import ImageService
from nixery.packages.graph import ClosureGraph, StorePath
from nixery.packages.names import parse_image_name
from nixery.packages.nix import Nix, NixSource, ResolvedPackage
from nixery.packages.popularity import Popularity, popcount
from nixery.packages.sources import SourceConfig, Sources
from nixery.storage import FilesystemStorage
from tests.conftest import FIXTURE_PKGS

pytestmark = pytest.mark.nix

SOURCE = NixSource("path", str(FIXTURE_PKGS))


@pytest.fixture(scope="module")
def nix() -> Nix:
    return Nix(timeout=300)


@pytest.fixture(scope="module")
def popularity(nix: Nix) -> Popularity:
    return popcount(nix, SOURCE, "x86_64-linux").popularity


def image(nix: Nix, name: str) -> tuple[list[ResolvedPackage], ClosureGraph]:
    packages = nix.resolve(SOURCE, "x86_64-linux", parse_image_name(name).packages)
    return packages, nix.closure(nix.realise(packages))


class Digest:
    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return len(data)


def digests(graph: ClosureGraph, popularity: Popularity, budget: int) -> list[str]:
    out = []
    for group in group_layers(graph, popularity, budget):
        sink = Digest()
        write_store_layer(group.paths, [Output(Compression(GZIP, 1), sink)])
        out.append(sink.hash.hexdigest())
    return out


def test_same_closure_gives_same_layers_and_digests(nix: Nix, popularity: Popularity) -> None:
    _, graph = image(nix, "shell/curl")
    items = list(graph.paths.values())
    random.Random(4).shuffle(items)
    shuffled = ClosureGraph(
        tuple(reversed(graph.roots)),
        {p.path: StorePath(p.path, p.nar_size, tuple(reversed(p.references))) for p in items},
    )
    for budget in (3, 94):
        for counts in (popularity, {}):  # with popularity data and without
            first = group_layers(graph, counts, budget)
            assert first == group_layers(shuffled, counts, budget)
            assert digests(graph, counts, budget) == digests(shuffled, counts, budget)


def test_small_package_set_gets_one_layer_per_path(nix: Nix, popularity: Popularity) -> None:
    # No fixture count reaches the threshold, but every library curl uses is
    # also a package of its own, so more popular than curl: spare budget
    # splits each off, which is the ideal for sharing.
    _, graph = image(nix, "curl")
    assert max(popularity.values()) < 100 and len(graph.paths) > 20
    layers = group_layers(graph, popularity, 94)
    assert sorted(layer.paths for layer in layers) == [(p,) for p in sorted(graph.paths)]
    for budget in range(1, len(graph.paths) + 1):
        layers = group_layers(graph, popularity, budget)
        assert len(layers) == budget
        assert sorted(p for layer in layers for p in layer.paths) == sorted(graph.paths)


def test_service_ranks_cacert_and_iana_etc_most_popular(
    nix: Nix, popularity: Popularity, tmp_path: Path
) -> None:
    packages, graph = image(nix, "hello")
    service = ImageService(
        FilesystemStorage(tmp_path),
        nix,
        Sources(SourceConfig("path", str(FIXTURE_PKGS))),
        BuildSettings(layer_budget=94),
        popularity,
    )
    layers = service.group(graph, packages)
    everywhere = {p.out for p in packages if p.attr_path in ("cacert", "iana-etc")}
    assert len(everywhere) == 2
    top = max(path_popularity(graph, popularity, everywhere).values())
    assert top == 100  # above every count, and at the popularity threshold
    for layer in layers:
        if set(layer.paths) & everywhere:
            assert layer.paths in {(p,) for p in everywhere}
            assert layer.rating == top * layer.size
    assert layers == group_layers(graph, popularity, 94, most_popular=everywhere)


def test_service_builds_with_the_layering_it_is_given(nix: Nix, tmp_path: Path) -> None:
    # The layering benchmark compares rules by passing them in; a build must use it.
    def one_layer(graph: ClosureGraph, *args: object, **kwargs: object) -> list[LayerGroup]:
        return [LayerGroup(tuple(sorted(graph.paths)), graph.total_size(), 0)]

    packages, graph = image(nix, "hello")
    service = ImageService(
        FilesystemStorage(tmp_path),
        nix,
        Sources(SourceConfig("path", str(FIXTURE_PKGS))),
        BuildSettings(),
        layering=one_layer,
    )
    source = service.sources.resolve("latest")
    built = service.image(parse_image_name("hello"), source, service.settings.platforms[0])
    assert [layer.paths for layer in built.layers] == [tuple(sorted(graph.paths)), ()]


def build_image(service: ImageService, name: str, may_build: bool = True) -> BuiltImage:
    source = service.sources.resolve("latest")
    request = parse_image_name(name)
    return service.image(request, source, service.settings.platforms[0], may_build=may_build)


@pytest.mark.parametrize("with_data", [True, False], ids=["with popularity", "without"])
def test_images_within_the_budget_get_a_layer_per_store_path(
    nix: Nix, popularity: Popularity, tmp_path: Path, with_data: bool
) -> None:
    """Built and stored by the service: every image of the fixture set fits
    the budget, so it has one layer per store path plus the root layer."""
    service = ImageService(
        FilesystemStorage(tmp_path),
        nix,
        Sources(SourceConfig("path", str(FIXTURE_PKGS))),
        BuildSettings(layer_budget=94),
        popularity if with_data else None,
    )
    for name in ("hello", "curl", "shell/python3", "curl/git/shell/wget"):
        _, graph = image(nix, name)
        built = build_image(service, name)
        assert len(built.layers) == len(graph.paths) + 1
        assert sorted(p for layer in built.layers for p in layer.paths) == sorted(graph.paths)
        assert all(len(layer.paths) == 1 for layer in built.layers[:-1])  # the root layer last
    # A tighter budget than the closure: exactly that many layers, plus the root.
    tight = ImageService(
        FilesystemStorage(tmp_path / "tight"),
        nix,
        Sources(SourceConfig("path", str(FIXTURE_PKGS))),
        BuildSettings(layer_budget=8),
        popularity if with_data else None,
    )
    assert len(build_image(tight, "curl").layers) == 8 + 1


def test_images_laid_out_by_another_layering_version_are_not_served(
    nix: Nix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def service() -> ImageService:
        return ImageService(
            FilesystemStorage(tmp_path),
            nix,
            Sources(SourceConfig("path", str(FIXTURE_PKGS))),
            BuildSettings(layer_budget=94),
        )

    built = build_image(service(), "hello")
    assert build_image(service(), "hello", may_build=False) == built
    monkeypatch.setattr(queue_module, "LAYERING_VERSION", "a later one")
    with pytest.raises(BuildNotAllowed):
        build_image(service(), "hello", may_build=False)
    # Built again under the new version: the same layers are reused, not packed.
    rebuilt = service()
    assert build_image(rebuilt, "hello") == built and rebuilt.layers_packed == 0
