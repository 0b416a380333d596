"""The real nixpkgs trees the Nix tests evaluate against (nothing is built
from them): nixpkgs' `lib`, and a full nixpkgs 24.11 tree shipped as a
tarball that is unpacked once per test session.

Both live in a `shared/` directory beside the repository (CI checks it out
at `<repo>/../shared`); `NIXERY_SHARED_DIR` names another place, and
`NIXPKGS_LIB` another `lib`. Without them the tests skip, except in CI
(`CI=true`), where a missing tree is a failure.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TARBALL = Path("nixpkgs") / "nixpkgs-24.11-eval.tar.xz"
LIB = Path("nixpkgs-lib") / "lib"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing(what: str) -> None:
    """Skip, or fail in CI: there every Nix test must run."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: these tests must run, not skip)")
    pytest.skip(what)


def shared_dir() -> Path | None:
    """`$NIXERY_SHARED_DIR`, else the nearest `shared/` beside the repository
    or one of its parents."""
    given = os.environ.get("NIXERY_SHARED_DIR")
    if given:
        return Path(given)
    for parent in ROOT.resolve().parents:
        if (parent / "shared" / "nixpkgs").is_dir() or (parent / "shared" / LIB).is_dir():
            return parent / "shared"
    return None


def lib_dir() -> str | None:
    """nixpkgs' lib: $NIXPKGS_LIB, the shared copy, or <nixpkgs/lib> on NIX_PATH."""
    given = os.environ.get("NIXPKGS_LIB")
    if given:
        if not (Path(given) / "default.nix").is_file():
            pytest.fail(f"NIXPKGS_LIB={given} is not nixpkgs' lib directory (no default.nix)")
        return given
    shared = shared_dir()
    if shared and (shared / LIB / "default.nix").is_file():
        return str(shared / LIB)
    proc = subprocess.run(
        ["nix-instantiate", "--find-file", "nixpkgs/lib"], capture_output=True, text=True
    )
    return proc.stdout.strip() or None


def tarball() -> Path | None:
    shared = shared_dir()
    if shared and (shared / TARBALL).is_file():
        return shared / TARBALL
    return None


def unpack(into: Path) -> Path:
    """Unpack the 24.11 tarball into `into`; the nixpkgs directory."""
    found = tarball()
    if found is None:
        missing(
            f"the nixpkgs 24.11 tree ({TARBALL}) is not in a shared/ directory beside the "
            "repository: set NIXERY_SHARED_DIR"
        )
        raise AssertionError("unreachable")
    subprocess.run(["tar", "-xJf", str(found), "-C", str(into)], check=True, timeout=600)
    tree = into / "nixpkgs"
    assert (tree / "nixos" / "lib" / "eval-config.nix").is_file(), f"no NixOS in {found}"
    return tree
