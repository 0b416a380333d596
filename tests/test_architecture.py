"""The import contracts of .importlinter (see ARCHITECTURE.md) catch wrong arrows.

scripts/test runs `lint-imports` on the tree as it is; these tests add one
wrong import at a time to a copy of the package and check that the contract
it breaks says so, so a contract that could never fail is noticed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# The import rules are a check of the repository, with a linter the Nix
# package's check phase does not bring.
pytestmark = pytest.mark.repo


def lint(tree: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    args = [str(LINT_IMPORTS), "--no-cache", *(f"--contract={c}" for c in contracts)]
    # The copy comes first on the path, ahead of the installed package.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)}
    return subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("pristine")
    shutil.copytree(ROOT / "nixery", tree / "nixery", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tree / ".importlinter")
    return tree


def test_the_tree_keeps_every_contract(pristine: Path) -> None:
    result = lint(pristine)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


WRONG_ARROWS = [
    # (module that gains the import, the import, the contract it breaks)
    ("storage/base.py", "from nixery.images import model", "flow"),
    ("packages/names.py", "from nixery.assembly import layers", "flow"),
    ("images/activity.py", "from nixery.ops import metrics", "flow"),
    ("http/headers.py", "from nixery.runtime import build_app", "flow"),
    ("images/packing.py", "from nixery.images import queue", "images"),
    ("images/model.py", "from nixery.images import service", "images"),
    ("http/web.py", "from nixery.packages.nix import Nix", "http-knows-no-nix"),
    ("http/app.py", "from nixery.packages import process", "http-knows-no-nix"),
    ("packages/catalog.py", "from nixery.packages import process", "one-choke-point"),
    ("config.py", "from nixery.images.model import BuildSettings", "settings"),
]


@pytest.mark.parametrize(("module", "statement", "contract"), WRONG_ARROWS)
def test_a_wrong_arrow_breaks_its_contract(
    pristine: Path, tmp_path: Path, module: str, statement: str, contract: str
) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(pristine, tree)
    path = tree / "nixery" / module
    # At the end of the module, so the import is seen whatever the module's header.
    path.write_text(path.read_text() + f"\n{statement}  # noqa\n")

    result = lint(tree, contract)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 broken" in result.stdout
    assert f"nixery.{module.removesuffix('.py').replace('/', '.')}" in result.stdout
