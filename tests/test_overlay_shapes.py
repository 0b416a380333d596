"""Overlays take effect whatever shape the package set has: a function that
declares `overlays`, a function that only has `...`, a plain set, and a
nixpkgs-like set with `appendOverlays`. Real Nix, the offline fixture set."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nixery.errors import UnknownPackages
from nixery.packages.nix import Nix, NixSource
from tests.conftest import FIXTURE_PKGS, StartServer
from tests.http import call

pytestmark = pytest.mark.nix

SYSTEM = "x86_64-linux"

# Adds a package that uses `hello` and replaces `ncurses`, which `nano` of the
# fixture set depends on. Nothing here is built: evaluation is enough.
OVERLAY = """final: prev: {
  internal-tool = derivation {
    name = "internal-tool-1.0";
    system = prev.hello.system;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "echo ${final.hello} > $out" ];
  };
  ncurses = derivation {
    name = "ncurses-internal";
    system = prev.hello.system;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "mkdir $out" ];
  };
}
"""

SHAPES = {
    # The fixture set itself: `{ system ? ..., overlays ? [ ], ... }:`.
    "function with overlays": None,
    # Hand-written sets often take only what they use.
    "function with ... only": f"{{ system ? builtins.currentSystem, ... }}:\n"
    f"import {FIXTURE_PKGS} {{ inherit system; }}\n",
    "plain set": f'import {FIXTURE_PKGS} {{ system = "{SYSTEM}"; }}\n',
    # As a flake's legacyPackages: a set, not a function, that re-applies
    # its fix-point with more overlays.
    "set with appendOverlays": f"""let
  make = overlays: import {FIXTURE_PKGS} {{ system = "{SYSTEM}"; inherit overlays; }}
    // {{ appendOverlays = more: make (overlays ++ more); }};
in make [ ]
""",
}

# How each shape gets the overlays, and whether the set's own packages (here
# `nano`) see an overlay's override: only a set that takes overlays into its
# fix-point can do that.
EXPECTED = {
    "function with overlays": ("overlays-argument", True),
    "function with ... only": ("on-top", False),
    "plain set": ("on-top", False),
    "set with appendOverlays": ("appendOverlays", True),
}


def source_for(shape: str, tmp_path: Path) -> NixSource:
    text = SHAPES[shape]
    if text is None:
        return NixSource("path", str(FIXTURE_PKGS))
    path = tmp_path / "set.nix"
    path.write_text(text)
    return NixSource("path", str(path))


def overlay_file(tmp_path: Path) -> str:
    path = tmp_path / "internal.nix"
    path.write_text(OVERLAY)
    return str(path)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_overlays_apply_to_every_shape(
    shape: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, overlay = source_for(shape, tmp_path), overlay_file(tmp_path)
    nix = Nix(timeout=120)
    caplog.set_level(logging.INFO, logger="nixery.packages.nix")
    [plain_nano, plain_hello] = nix.resolve(source, SYSTEM, ["nano", "hello"])

    tool, nano, hello = nix.resolve(source, SYSTEM, ["internal-tool", "nano", "hello"], [overlay])
    nix.resolve(source, SYSTEM, ["internal-tool"], [overlay])

    assert tool.attr_path == "internal-tool"
    assert hello == plain_hello
    mode, seen_by_set = EXPECTED[shape]
    assert (nano.drv != plain_nano.drv) is seen_by_set
    # Logged once, with the way they were applied, however often evaluated.
    modes = [getattr(r, "overlays", None) for r in caplog.records]
    assert [m for m in modes if m] == [mode]


def test_a_set_without_overlays_is_called_as_before(tmp_path: Path) -> None:
    # A function that requires `overlays` still gets an empty list.
    strict = tmp_path / "strict.nix"
    text = f"{{ system, overlays }}: import {FIXTURE_PKGS} {{ inherit system overlays; }}"
    strict.write_text(text)
    [hello] = Nix(timeout=120).resolve(NixSource("path", str(strict)), SYSTEM, ["hello"])
    assert hello.attr_path == "hello"


def test_unknown_name_says_how_overlays_were_applied(tmp_path: Path) -> None:
    source = source_for("function with ... only", tmp_path)
    with pytest.raises(UnknownPackages) as err:
        Nix(timeout=120).resolve(source, SYSTEM, ["not-defined"], [overlay_file(tmp_path)])
    assert err.value.names == ["not-defined"]
    assert err.value.overlays_applied == "on-top"


@pytest.mark.e2e
def test_registry_404_names_the_overlays(start_server: StartServer, tmp_path: Path) -> None:
    source = source_for("function with ... only", tmp_path)
    server = start_server("--pkgs-path", source.location, "--overlay", overlay_file(tmp_path))
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}

    missing = call(server.host, "GET", "/v2/not-defined/manifests/latest", accept)
    assert missing.status == 404
    [error] = missing.json()["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert error["detail"]["unknown_packages"] == ["not-defined"]
    overlays = error["detail"]["overlays"]
    assert overlays["files"] == ["internal.nix"]
    assert overlays["applied"].startswith("laid on top of the package set")

    # The overlay's package is found and built.
    found = call(server.host, "GET", "/v2/internal-tool/manifests/latest", accept)
    assert found.status == 200, found.body
    # Several evaluations (lookup, suggestions, build), one log line.
    assert server.log_text().count("overlay(s) laid on top of the package set") == 1


def test_registry_404_without_overlays_has_no_overlay_detail(
    start_server: StartServer,
) -> None:
    server = start_server()
    reply = call(server.host, "GET", "/v2/not-defined/manifests/latest")
    [error] = reply.json()["errors"]
    assert "overlays" not in error["detail"]
