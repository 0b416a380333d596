"""The module, the flake and the package on a real NixOS 24.11: systems
instantiated with nixpkgs' own module system (nothing built), their units,
firewall and timers, the config files checked by `nixery check-config`, the
VM test's driver, and the package's dependencies as nixpkgs 24.11 has them.

One `nix-instantiate` evaluates every system (see tests/nixos/eval-nixos.nix).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

pytestmark = pytest.mark.nix

ROOT = Path(__file__).parent.parent
HERE = Path(__file__).parent / "nixos"
# Nix 2.8 crashes (SIGSEGV) collecting evaluation memory during evaluations
# as large as several NixOS systems; each evaluation is short-lived, so its
# memory is simply left uncollected.
NIX_ENV = {**os.environ, "GC_DONT_GC": "1"}
STATE_DIR = "/var/lib/nixery"
# Not check inputs of the Nix package (nix/pkgs/nixery.nix leaves them out);
# import-linter is not in nixpkgs 24.11 at all.
LINTERS = ("pytest", "ruff", "mypy", "import-linter")


def nix_eval(file: str, **args: str) -> Any:
    argv = [
        "nix-instantiate",
        "--eval",
        "--strict",
        "--json",
        "--read-write-mode",
        str(HERE / file),
    ]
    for name, value in sorted(args.items()):
        argv += ["--argstr", name, value]
    proc = subprocess.run(argv, capture_output=True, text=True, env=NIX_ENV, timeout=1800)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def evaluated(nixpkgs_2411: Path) -> dict[str, Any]:
    result: dict[str, Any] = nix_eval("eval-nixos.nix", nixpkgs=str(nixpkgs_2411))
    return result


@pytest.fixture(scope="module")
def systems(evaluated: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = evaluated["systems"]
    return result


def unit_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "=" in line]


def assignments(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit_lines(text) if line.split("=", 1)[0] == key]


def test_every_system_instantiates(systems: dict[str, Any]) -> None:
    assert set(systems) == {"defaults", "flake", "s3", "channel"}
    for name, system in systems.items():
        assert system["failedAssertions"] == [], name
        for drv in (system["toplevel"], system["package"], system["configFile"]):
            assert drv.endswith(".drv") and Path(drv).is_file(), (name, drv)
        assert "-nixos-system-" in system["toplevel"]


def test_the_flakes_module_gives_the_same_system(systems: dict[str, Any]) -> None:
    # nixosModules.default (package from the flake) and the module with
    # nix/overlay.nix (package from pkgs) are one derivation.
    assert systems["flake"]["toplevel"] == systems["defaults"]["toplevel"]
    assert systems["flake"]["package"] == systems["defaults"]["package"]


def test_generated_unit(systems: dict[str, Any]) -> None:
    for name, system in systems.items():
        unit = system["unit"]
        [exec_start] = assignments(unit, "ExecStart")
        binary, command, flag, config = exec_start.split()
        assert binary.endswith("-nixery-0.1.0/bin/nixery") and (command, flag) == (
            "serve",
            "--config",
        )
        assert config.endswith("-nixery-checked.toml")
        assert assignments(unit, "User") == ["nixery"]
        assert assignments(unit, "Requires") == ["nix-daemon.socket"]
        assert "NIX_REMOTE=daemon" in " ".join(assignments(unit, "Environment"))
        for hardening in ("PrivateTmp=true", "ProtectSystem=strict", "NoNewPrivileges=true",
                          "StateDirectory=nixery", "SystemCallFilter=~@privileged"):  # fmt: skip
            assert hardening in unit_lines(unit), (name, hardening)
        # The daemon must see the roots: under the state directory, not the private /tmp.
        roots = system["settings"]["gc-roots-dir"]
        assert roots == f"{STATE_DIR}/gc-roots"
    s3 = systems["s3"]["unit"]
    assert assignments(s3, "LoadCredential") == ["s3-credentials:/run/secrets/nixery-s3"]
    assert '"AWS_SHARED_CREDENTIALS_FILE=%d/s3-credentials"' in assignments(s3, "Environment")
    assert assignments(s3, "EnvironmentFile") == ["/run/secrets/nixery.env"]
    assert "/run/secrets" not in json.dumps(systems["s3"]["settings"])
    # Port 80: the bind capability and nothing else.
    channel = systems["channel"]["unit"]
    assert assignments(channel, "AmbientCapabilities") == ["CAP_NET_BIND_SERVICE"]
    assert assignments(channel, "CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]
    assert assignments(systems["defaults"]["unit"], "AmbientCapabilities") == []


def test_firewall_and_gc_timer(systems: dict[str, Any]) -> None:
    assert 80 in systems["channel"]["firewall"]
    assert systems["defaults"]["firewall"] == []
    for name in ("defaults", "flake", "channel"):
        assert systems[name]["gcTimer"] is None and systems[name]["gcUnit"] is None
    timer = systems["s3"]["gcTimer"]
    assert assignments(timer, "OnCalendar") == ["hourly"]
    assert assignments(timer, "Persistent") == ["true"]
    assert assignments(timer, "WantedBy") == ["timers.target"]
    gc_unit = systems["s3"]["gcUnit"]
    [exec_start] = assignments(gc_unit, "ExecStart")
    assert exec_start.split()[1:] == [
        "gc", "--keep-days", "7", "--grace", "3600", "--storage-backend", "s3",
        "--s3-bucket", "images", "--s3-endpoint", "https://s3.example.org",
        "--s3-region", "eu-west-1",
    ]  # fmt: skip
    assert assignments(gc_unit, "LoadCredential") == ["s3-credentials:/run/secrets/nixery-s3"]
    assert assignments(gc_unit, "User") == ["nixery"]


def toml_file(settings: dict[str, Any], path: Path) -> Path:
    """The settings as TOML. The module's values are strings, numbers, booleans
    and lists of strings, whose JSON spelling is also TOML's."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in sorted(settings.items())]
    path.write_text("\n".join(lines) + "\n")
    assert tomllib.loads(path.read_text()) == settings
    return path


def test_each_config_file_passes_check_config(systems: dict[str, Any], tmp_path: Path) -> None:
    # Without --syntax-only, as the module runs it: the package set and the
    # overlay directory the file names are in the store.
    for name, system in systems.items():
        config = toml_file(system["settings"], tmp_path / f"{name}.toml")
        proc = subprocess.run(
            [sys.executable, "-m", "nixery", "check-config", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    defaults = systems["defaults"]["settings"]
    assert Path(defaults["default-pkgs-path"], "nixos", "lib", "eval-config.nix").is_file()
    channel = systems["channel"]["settings"]
    assert channel["channel"] == "nixos-24.11" and channel["layer-budget"] == 124
    # The overlay directory was copied whole: its default.nix imports a file beside it.
    [overlay] = channel["overlay"]
    assert {p.name for p in Path(overlay).iterdir()} == {"default.nix", "internal-tool.nix"}
    assert systems["s3"]["settings"]["storage-backend"] == "s3"


def test_vm_test_driver_instantiates(evaluated: dict[str, Any]) -> None:
    vm = evaluated["vmTest"]
    assert re.search(r"-nixos-test-driver-nixery-registry\.drv$", vm["driver"]), vm["driver"]
    assert vm["run"].endswith("-vm-test-run-nixery-registry.drv")
    for drv in vm.values():
        assert Path(drv).is_file()


def pypi_name(requirement: Requirement) -> str:
    """As nixpkgs names Python packages (and nix/pkgs/nixery.nix looks them up)."""
    return re.sub(r"[-_.]+", "-", requirement.name).lower()


def test_dependency_bounds_hold_in_nixpkgs_2411(nixpkgs_2411: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [
        r
        for r in map(Requirement, project["optional-dependencies"]["test"])
        if pypi_name(r) not in LINTERS
    ]
    names = [pypi_name(r) for r in requirements]
    found = nix_eval(
        "eval-python-versions.nix", nixpkgs=str(nixpkgs_2411), namesJSON=json.dumps(names)
    )
    unmet = [
        f"{r} (24.11 has {found['packages'][pypi_name(r)]})"
        for r in requirements
        if found["packages"][pypi_name(r)] is None
        or Version(found["packages"][pypi_name(r)]) not in r.specifier
    ]
    assert unmet == []
    python = Version(found["python"])
    assert python in Requirement(f"python{project['requires-python']}").specifier
