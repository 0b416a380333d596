"""The Nix adapter against real Nix and the offline fixture package set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nixery.errors import BuildFailed, UnknownPackages
from nixery.packages import process
from nixery.packages.graph import parse_registration
from nixery.packages.nix import Nix, NixSource
from tests.conftest import FIXTURE_PKGS

pytestmark = pytest.mark.nix

SOURCE = NixSource("path", str(FIXTURE_PKGS))
SYSTEM = "x86_64-linux"


@pytest.fixture(scope="module")
def nix() -> Nix:
    return Nix(timeout=120)


def test_resolves_nested_case_insensitive_and_underscored(nix: Nix) -> None:
    found = nix.resolve(
        SOURCE, SYSTEM, ["haskellpackages.pandoc", "HELLO", "_1password", "xorg.xev"]
    )
    assert [p.attr_path for p in found] == [
        "haskellPackages.pandoc",
        "hello",
        "_1password",
        "xorg.xev",
    ]
    assert all(p.drv.endswith(".drv") and p.out.startswith("/nix/store/") for p in found)


def test_reports_every_unknown_name(nix: Nix) -> None:
    with pytest.raises(UnknownPackages) as err:
        nix.resolve(SOURCE, SYSTEM, ["hello", "nope", "notAPackage", "hello.nope", "xorg"])
    assert err.value.names == ["hello.nope", "nope", "notAPackage", "xorg"]


def test_names_are_data_not_code(nix: Nix, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = [
        f'hello"; builtins.toFile "x" "{marker}',
        '${builtins.abort "x"}',
        "a\nb",
        "../../etc",
    ]
    with pytest.raises(UnknownPackages) as err:
        nix.resolve(SOURCE, SYSTEM, hostile)
    assert sorted(err.value.names) == sorted(hostile)
    assert not marker.exists()


def test_realise_and_closure_graph(nix: Nix) -> None:
    [curl] = nix.resolve(SOURCE, SYSTEM, ["curl"])
    outs = nix.realise([curl])
    assert outs == [curl.out]
    graph = nix.closure(outs)
    assert graph.roots == (curl.out,)
    assert curl.out in graph.paths
    assert all(ref in graph.paths for p in graph.paths.values() for ref in p.references)
    # Real ELF references: curl reaches glibc through more than one level.
    glibc = [
        p for p in graph.paths if p.endswith(tuple(["-glibc", "glibc-2.36"])) or "-glibc-" in p
    ]
    assert glibc, sorted(graph.paths)
    assert glibc[0] not in graph.paths[curl.out].references or len(graph.paths) > 3
    assert len(graph.paths) >= 4
    # NAR sizes agree with Nix's own accounting.
    size = process.run(["nix-store", "--query", "--size", curl.out]).stdout.strip()
    assert graph.paths[curl.out].nar_size == int(size)
    # The same graph as Nix's own database dump of the requisites.
    requisites = process.run(["nix-store", "--query", "--requisites", curl.out]).stdout.split()
    assert sorted(graph.paths) == sorted(requisites)
    dump = process.run(["nix-store", "--dump-db", *requisites]).stdout
    assert graph.paths == parse_registration(dump)


def test_build_failure_carries_the_log(nix: Nix) -> None:
    [broken] = nix.resolve(SOURCE, SYSTEM, ["broken"])
    with pytest.raises(BuildFailed) as err:
        nix.realise([broken])
    assert "broken on purpose" in err.value.log_tail


def test_timeout_is_enforced(tmp_path: Path) -> None:
    slow = tmp_path / "slow.nix"
    slow.write_text(
        'let d = derivation { name = "slow"; system = builtins.currentSystem;'
        ' builder = "/bin/busybox"; args = [ "sh" "-c" "sleep 30; echo > $out" ]; }; '
        "in { system ? null, overlays ? [], ... }: { slow = d; cacert = d; }"
    )
    quick = Nix(timeout=2)
    [pkg] = quick.resolve(NixSource("path", str(slow)), SYSTEM, ["slow"])
    with pytest.raises(BuildFailed) as err:
        quick.realise([pkg])
    assert "timed out" in err.value.summary


def test_args_reach_nix_as_a_json_file(nix: Nix, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    real_run = process.run

    def spy(argv: list[str], **kw: object) -> process.Completed:
        seen.append(argv)
        if argv[0] == "nix-instantiate":
            args_file = argv[argv.index("argsFile") + 1]
            assert json.loads(Path(args_file).read_text())["packages"] == ["hello"]
        return real_run(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(process, "run", spy)
    nix.resolve(SOURCE, SYSTEM, ["hello"])
    [argv] = seen
    assert argv[:5] == ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode"]
    assert argv[-3:-1] == ["--argstr", "argsFile"]
    assert not any("hello" in a for a in argv)


def test_metadata_of_the_build_graph_comes_with_the_resolution(nix: Nix) -> None:
    resolution = nix.resolve_with_metadata(SOURCE, SYSTEM, ["hello", "curl"])
    assert resolution.packages == nix.resolve(SOURCE, SYSTEM, ["hello", "curl"])
    hello, curl = resolution.packages
    about = resolution.metadata[hello.out]
    assert (about.name, about.version, about.output) == ("hello", "2.10", "out")
    assert about.licenses == ("GPL-3.0-or-later",)
    assert about.homepage == "https://www.gnu.org/software/hello/manual/"
    assert about.description == "Program that prints a friendly greeting"
    # Dependencies are found through the derivations' arguments: every
    # store path of curl's closure has its entry.
    outs = nix.realise([curl])
    closure = nix.closure(outs)
    assert set(closure.paths) <= set(resolution.metadata)
    names = {resolution.metadata[p].name for p in closure.paths}
    assert {"curl", "libcurl", "glibc", "openssl"} <= names


def test_metadata_that_fails_to_evaluate_is_left_out(nix: Nix, tmp_path: Path) -> None:
    """Metadata is informative: odd types, throws and `mirror://` URLs do
    not fail the resolution. The set has nixpkgs' mirror list where nixpkgs has it."""
    mirrors = tmp_path / "pkgs" / "build-support" / "fetchurl"
    mirrors.mkdir(parents=True)
    (mirrors / "mirrors.nix").write_text('{ gnu = [ "https://ftpmirror.gnu.org/" ]; }\n')
    (tmp_path / "default.nix").write_text(
        """{ system ? builtins.currentSystem, ... }:
let
  dep = derivation {
    name = "dep-1.0"; inherit system; builder = "/bin/sh"; args = [ "-c" "echo > $out" ];
  } // { pname = "dep"; version = "1.0"; meta.license = "a string, not a licence"; };
  drv = derivation {
    name = "odd-2.0"; inherit system; builder = "/bin/sh"; args = [ "-c" "echo > $out" ];
    inherit dep;
  };
in {
  path = ./.;
  odd = drv // {
    pname = "odd"; version = "2.0"; src = { urls = [ "mirror://gnu/odd/odd-2.0.tar.gz" ]; };
    meta = {
      license = [ { spdxId = "MIT"; } { shortName = "custom"; } 42 ];
      homepage = throw "no homepage";
      description = 7;
    };
  };
}
"""
    )
    resolution = nix.resolve_with_metadata(NixSource("path", str(tmp_path)), SYSTEM, ["odd"])
    [odd] = resolution.packages
    about = resolution.metadata[odd.out]
    assert about.licenses == ("MIT",)
    assert about.homepage is None and about.description is None
    assert about.source == "https://ftpmirror.gnu.org/odd/odd-2.0.tar.gz"
    [dep] = [m for m in resolution.metadata.values() if m.name == "dep"]
    assert dep.licenses == () and dep.version == "1.0"


def test_metadata_that_aborts_leaves_the_resolution_without_it(
    nix: Nix, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "default.nix").write_text(
        """{ system ? builtins.currentSystem, ... }: {
  aborts = derivation {
    name = "aborts-1.0"; inherit system; builder = "/bin/sh"; args = [ "-c" "echo > $out" ];
  } // { meta.homepage = abort "not even tryEval catches this"; };
}
"""
    )
    source = NixSource("path", str(tmp_path))
    resolution = nix.resolve_with_metadata(source, SYSTEM, ["aborts"])
    assert resolution.packages == nix.resolve(source, SYSTEM, ["aborts"])
    assert resolution.metadata == {}
    assert "reading package metadata failed" in caplog.text
