"""The Nix package's check phase, rehearsed: its unit-test selection runs on
the package's own source files, without Nix on PATH, without a writable
home, and without the Python packages the package does not bring.

A test that runs Nix but lacks the `nix` marker, or reads a file the
package leaves out, fails here rather than in a NixOS build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "nix" / "pkgs" / "nixery.nix"

# Runs the whole unit selection; itself outside it, so it never runs itself.
pytestmark = pytest.mark.e2e


def package_files() -> list[str]:
    """The paths the package's source is made of (its `lib.fileset.unions`)."""
    text = PACKAGE.read_text()
    union = re.search(r"fileset = lib\.fileset\.unions \[(.*?)\];", text, re.DOTALL)
    assert union, "no fileset in nix/pkgs/nixery.nix"
    return re.findall(r"^\s*\.\./\.\./(\S+)$", union.group(1), re.MULTILINE)


def unit_selection() -> list[str]:
    """The package's pytest flags (`pytestFlagsArray`)."""
    flags = re.search(r"pytestFlagsArray = \[(.*?)\];", PACKAGE.read_text(), re.DOTALL)
    assert flags, "no pytestFlagsArray in nix/pkgs/nixery.nix"
    return re.findall(r'"([^"]*)"', flags.group(1))


def path_without_nix(directory: Path) -> str:
    """A directory of links to every program on PATH but Nix's own."""
    directory.mkdir()
    for entry in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(entry):
            continue
        for program in sorted(os.listdir(entry)):
            source = os.path.join(entry, program)
            if program == "nix" or program.startswith("nix-"):
                continue
            target = directory / program
            if os.access(source, os.X_OK) and not target.exists() and not target.is_symlink():
                target.symlink_to(source)
    return str(directory)


def hide_modules(directory: Path, extras: list[str]) -> str:
    """Modules that fail to import, for the distributions of `extras` (the
    package's check phase has only the `test` extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {
        re.split(r"[^A-Za-z0-9._-]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for extra in extras
        for requirement in project["optional-dependencies"][extra]
    }
    hidden = sorted(
        module
        for module, distributions in packages_distributions().items()
        if any(d.lower().replace("_", "-") in wanted for d in distributions)
    )
    assert hidden, wanted
    for module in hidden:
        (directory / module).mkdir(parents=True)
        (directory / module / "__init__.py").write_text(
            f"raise ImportError('{module} is not in the Nix package')\n"
        )
    return str(directory)


def test_the_package_unit_tests_pass_without_nix(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for name in package_files():
        path = ROOT / name
        assert path.exists(), f"the package names {name}, which does not exist"
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, source / name)
    bin_dir = path_without_nix(tmp_path / "bin")
    assert shutil.which("nix-instantiate", path=bin_dir) is None
    assert shutil.which("git", path=bin_dir) and shutil.which("tar", path=bin_dir)
    env = {
        "PATH": bin_dir,
        "HOME": str(tmp_path / "homeless-shelter"),  # as in a Nix build: absent
        "PYTHONPATH": hide_modules(tmp_path / "hidden", ["clients", "browser"]),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp_path),
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *unit_selection()],
        cwd=source, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1:] or [run.stderr]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", summary[0]) and "skipped" not in summary[0], summary
