"""Package lookups and "did you mean", against real Nix and the fixture set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nixery.errors import BuildFailed
from nixery.packages.catalog import Catalog
from nixery.packages.names import image_component
from nixery.packages.nix import Nix, NixSource
from tests.conftest import FIXTURE_PKGS

pytestmark = pytest.mark.nix

SOURCE = NixSource("path", str(FIXTURE_PKGS))
REVISION = f"path:{FIXTURE_PKGS}"
SYSTEM = "x86_64-linux"


class CountingNix(Nix):
    """The real Nix, counting evaluations (to see what the cache saves)."""

    calls: list[int]

    def describe(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append(1)
        return super().describe(*args, **kwargs)


@pytest.fixture
def nix() -> CountingNix:
    nix = CountingNix(timeout=120)
    object.__setattr__(nix, "calls", [])
    return nix


def test_describe_reads_version_and_description(nix: Nix) -> None:
    found, refused, attributes = nix.describe(
        SOURCE, SYSTEM, ["HELLO", "xorg.xev", "nope", "notAPackage"], list_attributes=True
    )
    assert refused == []
    by_name = {p.name: p for p in found}
    assert set(by_name) == {"HELLO", "xorg.xev"}
    assert by_name["HELLO"].attr_path == "hello"
    assert by_name["HELLO"].version == "2.10"
    assert by_name["HELLO"].description == "Program that prints a friendly greeting"
    assert by_name["xorg.xev"].attr_path == "xorg.xev"
    assert attributes is not None
    assert {"hello", "curl", "xorg", "haskellPackages", "_1password"} <= set(attributes)


def test_version_shows_nix_runs(nix: Nix) -> None:
    assert "Nix" in nix.version()


def test_lookup_found_missing_and_suggestions(nix: CountingNix) -> None:
    catalog = Catalog(nix)
    hello = catalog.lookup(SOURCE, REVISION, SYSTEM, "hello")
    assert hello.found and hello.info is not None
    assert hello.info.version == "2.10" and hello.image_name == "hello"
    assert hello.suggestions == ()

    miss = catalog.lookup(SOURCE, REVISION, SYSTEM, "helo")
    assert not miss.found
    assert miss.suggestions[0] == "hello"

    digits = catalog.lookup(SOURCE, REVISION, SYSTEM, "1password")
    assert digits.info is not None and digits.info.attr_path == "_1password"
    assert digits.image_name == "1password"

    assert catalog.suggest(SOURCE, REVISION, SYSTEM, "gti") == ["git"]
    assert (
        catalog.suggest(SOURCE, REVISION, SYSTEM, "haskelpackages.pandoc")[0] == "haskellPackages"
    )
    # The set exists; nothing is indexed below the top level.
    assert catalog.suggest(SOURCE, REVISION, SYSTEM, "xorg.xevv") == []


def test_lookups_and_the_name_list_are_cached(nix: CountingNix) -> None:
    catalog = Catalog(nix)
    catalog.lookup(SOURCE, REVISION, SYSTEM, "helo")  # one evaluation: the name and the list
    catalog.lookup(SOURCE, REVISION, SYSTEM, "helo")
    catalog.suggest(SOURCE, REVISION, SYSTEM, "crul")
    assert len(nix.calls) == 1
    catalog.lookup(SOURCE, REVISION, SYSTEM, "curl")
    assert len(nix.calls) == 2


def test_expired_entries_are_looked_up_again(nix: CountingNix) -> None:
    now = [0.0]
    catalog = Catalog(nix, ttl=60, clock=lambda: now[0])
    catalog.lookup(SOURCE, REVISION, SYSTEM, "hello")
    now[0] = 59.0
    catalog.lookup(SOURCE, REVISION, SYSTEM, "hello")
    assert len(nix.calls) == 1
    now[0] = 61.0
    catalog.lookup(SOURCE, REVISION, SYSTEM, "hello")
    assert len(nix.calls) == 2


@pytest.mark.parametrize(
    ("attr", "component"),
    [("hello", "hello"), ("haskellPackages.pandoc", "haskellpackages.pandoc"),
     ("_1password", "1password"), ("foo._7zip", "foo.7zip"), ("_private", None),
     ("a__b", "a__b"), ("with space", None)],
)  # fmt: skip
def test_image_component_inverts_attribute_names(attr: str, component: str | None) -> None:
    assert image_component(attr) == component


NIXPKGS_LIKE = NixSource("path", str(FIXTURE_PKGS.parent / "nixpkgs-like"))


def test_a_name_that_refuses_to_evaluate_is_present_with_nixs_reason(nix: CountingNix) -> None:
    catalog = Catalog(nix)
    revision = f"path:{NIXPKGS_LIKE.location}"
    unfree = catalog.lookup(NIXPKGS_LIKE, revision, SYSTEM, "unfree-tool")
    assert unfree.present and not unfree.found
    assert unfree.refused is not None and "has an unfree license" in unfree.refused
    assert unfree.suggestions == ()
    removed = catalog.lookup(NIXPKGS_LIKE, revision, SYSTEM, "old-tool")
    assert removed.refused == "'old-tool' has been removed because it was unmaintained"
    missing = catalog.lookup(NIXPKGS_LIKE, revision, SYSTEM, "unfree-tol")
    assert not missing.present and missing.suggestions[0] == "unfree-tool"


def test_suggestions_give_up_when_listing_the_names_takes_too_long(
    nix: CountingNix, tmp_path: Path
) -> None:
    """A package set whose evaluation blocks (on a FIFO nobody writes): no suggestions."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    (tmp_path / "default.nix").write_text(
        f'{{ ... }}: builtins.seq (builtins.readFile "{gate}") {{ hello = 1; }}\n'
    )
    catalog = Catalog(nix, list_timeout=1)
    blocked = NixSource("path", str(tmp_path))
    with pytest.raises(BuildFailed, match="timed out after 1s"):
        catalog.suggest(blocked, "blocked", SYSTEM, "helo")
