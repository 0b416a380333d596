"""Image names against real nixpkgs (24.11), by evaluation only: the code
path the server takes from an image name to derivations (names ->
`Sources` -> `Nix.resolve`), and the catalog's lookups and suggestions."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixery.errors import UnknownPackages
from nixery.packages.catalog import Catalog
from nixery.packages.names import SHELL_PACKAGES, parse_image_name
from nixery.packages.nix import Nix, NixSource, ResolvedPackage
from nixery.packages.sources import LATEST, ResolvedSource, Sources, source_config

pytestmark = pytest.mark.nix

SYSTEM = "x86_64-linux"
# An overlay given as a directory whose default.nix imports a file beside it.
OVERLAY = Path(__file__).parent / "nixos" / "overlay"


class PackageSet:
    """nixpkgs as the server sees it: a configured source, resolved to a pin."""

    def __init__(self, tree: Path, overlays: tuple[str, ...] = ()) -> None:
        self.nix = Nix(timeout=300)
        self.overlays = overlays
        config = source_config(str(tree), None, None)
        self.sources = Sources(config, self.nix, overlays, 300)
        self.pin: ResolvedSource = self.sources.resolve(LATEST)
        self.source: NixSource = self.sources.nix_source(self.pin)

    def resolve(self, image: str) -> dict[str, ResolvedPackage]:
        """The packages an image name asks for, by the attribute asked."""
        request = parse_image_name(image)
        found = self.nix.resolve(self.source, SYSTEM, request.packages, self.overlays)
        return {p.name: p for p in found}

    def refusal(self, image: str) -> UnknownPackages:
        with pytest.raises(UnknownPackages) as caught:
            self.resolve(image)
        return caught.value


@pytest.fixture(scope="module")
def nixpkgs(nixpkgs_2411: Path) -> PackageSet:
    return PackageSet(nixpkgs_2411)


@pytest.fixture(scope="module")
def with_overlay(nixpkgs_2411: Path) -> PackageSet:
    return PackageSet(nixpkgs_2411, (str(OVERLAY),))


def test_shell_nested_sets_and_case_insensitive_names(nixpkgs: PackageSet) -> None:
    # One evaluation, as for one image.
    found = nixpkgs.resolve("shell/git/python3packages.requests/xorg.xev/sdl2/7zz")
    assert set(found) == {
        *SHELL_PACKAGES,
        "cacert",
        "iana-etc",
        "git",
        "python3packages.requests",
        "xorg.xev",
        "sdl2",
        "_7zz",
    }
    attr_paths = {name: p.attr_path for name, p in found.items()}
    # Registry names are lowercase; nixpkgs' attributes are found whatever their case.
    assert attr_paths["python3packages.requests"] == "python3Packages.requests"
    assert attr_paths["sdl2"] == "SDL2"
    assert attr_paths["xorg.xev"] == "xorg.xev"
    # A leading digit: nixpkgs prefixes an underscore.
    assert attr_paths["_7zz"] == "_7zz"
    assert attr_paths["bashInteractive"] == "bashInteractive"
    for package in found.values():
        assert package.drv.startswith("/nix/store/") and package.drv.endswith(".drv")
        assert package.out.startswith("/nix/store/")
        assert package.output == "out"
    assert "-git-2." in found["git"].out
    assert "-python3.12-requests-" in found["python3packages.requests"].out


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("vscode", "has an unfree license"),
        ("python27", "is marked as insecure"),
        ("gcc48", "gcc48 has been removed from Nixpkgs"),
    ],
    ids=["unfree", "insecure", "removed-alias"],
)
def test_refused_packages_carry_nixpkgs_reason(nixpkgs: PackageSet, name: str, reason: str) -> None:
    refused = nixpkgs.refusal(f"hello/{name}")
    assert refused.names == []
    assert list(refused.refused) == [name]
    assert reason in refused.refused[name]


def test_unknown_names_with_suggestions(nixpkgs: PackageSet) -> None:
    unknown = nixpkgs.refusal("hello/helo/xorg.nosuchthing")
    assert unknown.names == ["helo", "xorg.nosuchthing"]
    assert unknown.refused == {}

    catalog = Catalog(nixpkgs.nix)
    revision = nixpkgs.pin.revision
    lookup = catalog.lookup(nixpkgs.source, revision, SYSTEM, "helo")
    assert not lookup.found
    assert "hello" in lookup.suggestions
    # A miss inside a set that exists suggests nothing at the top level.
    assert catalog.suggest(nixpkgs.source, revision, SYSTEM, "xorg.nosuchthing") == []
    found = catalog.lookup(nixpkgs.source, revision, SYSTEM, "python3packages.requests")
    assert found.info is not None and found.info.attr_path == "python3Packages.requests"
    assert found.image_name == "python3packages.requests"


def test_an_overlay_directory_adds_an_internal_package(
    nixpkgs: PackageSet, with_overlay: PackageSet
) -> None:
    found = with_overlay.resolve("shell/internal-tool")
    assert found["internal-tool"].attr_path == "internal-tool"
    assert found["internal-tool"].out.endswith("-internal-tool")
    # The overlay is part of what the tag means: another revision, another cache key.
    assert with_overlay.pin.revision != nixpkgs.pin.revision
    assert nixpkgs.refusal("internal-tool").names == ["internal-tool"]
    lookup = Catalog(with_overlay.nix, with_overlay.overlays).lookup(
        with_overlay.source, with_overlay.pin.revision, SYSTEM, "internal-tool"
    )
    assert lookup.info is not None
    assert lookup.info.description == "A package only an overlay has"
