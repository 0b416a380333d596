"""How names that exist but do not evaluate, and the server's own nixpkgs
configuration, reach users: against real Nix and a nixpkgs-like package set
(`fixtures/nixpkgs-like`) whose packages refuse to evaluate as nixpkgs' do."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from nixery.errors import UnknownPackages
from nixery.packages.nix import Nix, NixSource, _error_message
from tests.conftest import FIXTURE_PKGS, StartServer
from tests.http import call

NIXPKGS_LIKE = NixSource("path", str(FIXTURE_PKGS.parent / "nixpkgs-like"))
SYSTEM = "x86_64-linux"
UNFREE = "Package ‘unfree-tool-1.0’ has an unfree license (‘unfree’), refusing to evaluate."
REMOVED = "'old-tool' has been removed because it was unmaintained"


@pytest.fixture
def nix() -> Nix:
    return Nix(timeout=120)


@pytest.mark.nix
def test_names_that_refuse_to_evaluate_say_why(nix: Nix) -> None:
    with pytest.raises(UnknownPackages) as err:
        nix.resolve(NIXPKGS_LIKE, SYSTEM, ["hello", "unfree-tool", "old-tool", "nope"])
    assert err.value.names == ["nope"]
    assert err.value.refused == {"old-tool": REMOVED, "unfree-tool": UNFREE}


@pytest.mark.nix
def test_the_servers_nixpkgs_config_does_not_change_packages(
    nix: Nix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [hello] = nix.resolve(NIXPKGS_LIKE, SYSTEM, ["hello"])
    config = tmp_path / ".config" / "nixpkgs" / "config.nix"
    config.parent.mkdir(parents=True)
    config.write_text("{ allowUnfree = true; packageOverrides = pkgs: { hello = pkgs.bash; }; }")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NIXPKGS_ALLOW_UNFREE", "1")
    assert nix.resolve(NIXPKGS_LIKE, SYSTEM, ["hello"]) == [hello]
    monkeypatch.setenv("NIXPKGS_CONFIG", str(config))
    assert nix.resolve(NIXPKGS_LIKE, SYSTEM, ["hello"]) == [hello]
    with pytest.raises(UnknownPackages) as err:
        nix.resolve(NIXPKGS_LIKE, SYSTEM, ["unfree-tool"])
    assert err.value.refused == {"unfree-tool": UNFREE}


@pytest.mark.e2e
def test_a_pull_of_a_refused_package_names_it_and_the_reason(start_server: StartServer) -> None:
    server = start_server("--pkgs-path", NIXPKGS_LIKE.location)
    reply = call(server.host, "GET", "/v2/hello/unfree-tool/old-tool/manifests/latest")
    assert reply.status == 404, reply.body
    [error] = reply.json()["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert error["detail"] == {"refused_packages": {"old-tool": REMOVED, "unfree-tool": UNFREE}}
    assert "unfree-tool: " + UNFREE in error["message"]
    assert "old-tool: " + REMOVED in error["message"]


# Current Nix prints a few trace frames before the message (Nix 2.8 prints
# the message alone, as the tests above see); the message is still found.
CURRENT_NIX_STDERR = """\
error:
       \x1b[35;1m… while evaluating the attribute 'drvPath'\x1b[0m
         at /nix/store/0000-source/lib/customisation.nix:365:7:
          365|       drvPath =
             |       ^

       … while calling the 'throw' builtin
         at /nix/store/0000-source/pkgs/stdenv/generic/check-meta.nix:500:9:

       (stack trace truncated; use '--show-trace' to show the full trace)

       error: Package ‘tool-1.0’ in /nix/store/0000-source/pkgs/tool.nix:9 has an unfree
       license (‘unfree’), refusing to evaluate.

       a) To temporarily allow unfree packages, you can use an environment variable
          for a single invocation of the nix tools.
"""


def test_the_reason_is_the_first_paragraph_of_the_last_error() -> None:
    assert _error_message(CURRENT_NIX_STDERR) == (
        "Package ‘tool-1.0’ in /nix/store/0000-source/pkgs/tool.nix:9 has an unfree"
        " license (‘unfree’), refusing to evaluate."
    )
    assert _error_message("warning: something\n") == ""


@pytest.mark.e2e
def test_the_lookup_page_shows_a_refused_package_as_present_with_the_reason(
    start_server: StartServer,
) -> None:
    server = start_server("--pkgs-path", NIXPKGS_LIKE.location)
    unfree = call(server.host, "GET", "/packages/unfree-tool")
    assert unfree.status == 200
    page = html.unescape(unfree.body.decode())
    assert "Not in the package set" not in page
    assert "In the package set, but it refuses to evaluate" in page
    assert UNFREE in page and "config.allowUnfree" in page
    removed = html.unescape(call(server.host, "GET", "/packages/old-tool").body.decode())
    assert REMOVED in removed and "cannot be allowed" in removed
    missing = html.unescape(call(server.host, "GET", "/packages/no-such-tool").body.decode())
    assert "Not in the package set" in missing


@pytest.mark.e2e
def test_a_404_suggests_what_the_lookup_page_suggests(start_server: StartServer) -> None:
    server = start_server()
    reply = call(server.host, "GET", "/v2/shell/gti/helo/crul/manifests/latest")
    assert reply.status == 404, reply.body
    detail = reply.json()["errors"][0]["detail"]
    assert detail["unknown_packages"] == ["crul", "gti", "helo"]
    for name in detail["unknown_packages"]:
        page = call(server.host, "GET", f"/packages/{name}").body.decode()
        on_page = re.findall(r'<li><a href="/packages/([^"]+)">', page)
        assert detail["suggestions"][name] == on_page != []
