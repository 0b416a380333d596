"""The Nix files: every one parses, and with nixpkgs' `lib` the NixOS module,
the package and the flake evaluate to what they promise (see
tests/nixos/README.md)."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest

from tests import nixpkgs

pytestmark = pytest.mark.nix

ROOT = Path(__file__).parent.parent
HERE = Path(__file__).parent / "nixos"
STUB_STORE = "/nix/store/00000000000000000000000000000000-"
PACKAGE = STUB_STORE + "nixery-0.1.0"
NIXPKGS = STUB_STORE + "nixpkgs-source"
CHECKED = STUB_STORE + "nixery-checked.toml"
RENDERED = STUB_STORE + "nixery.toml"
UNIT_TESTS = "not e2e and not nix and not repo"


def nix_files() -> list[Path]:
    skip = {".git", ".venv", "node_modules"}
    return sorted(
        p
        for p in ROOT.rglob("*.nix")
        if not skip & set(p.relative_to(ROOT).parts) and not p.name.startswith("result")
    )


def run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("path", nix_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nix_file_parses(path: Path) -> None:
    run(["nix-instantiate", "--parse", str(path)])


def test_every_nix_file_is_found() -> None:
    found = {str(p.relative_to(ROOT)) for p in nix_files()}
    assert {
        "flake.nix",
        "default.nix",
        "nix/modules/nixery.nix",
        "nix/pkgs/nixery.nix",
    } <= found
    assert "nixery/packages/nixexprs/resolve.nix" in found


@functools.cache
def find_lib() -> str | None:
    return nixpkgs.lib_dir()


@pytest.fixture
def lib() -> str:
    path = find_lib()
    if path is None:
        nixpkgs.missing(
            "nixpkgs' lib not found: set NIXPKGS_LIB to the lib directory of a nixpkgs "
            "checkout (or of the nixpkgs.lib flake), or put nixpkgs on NIX_PATH"
        )
    assert path is not None
    return path


@functools.cache
def evaluate(file: str, read_write: bool = False, **args: str) -> Any:
    argv = ["nix-instantiate", "--eval", "--strict", "--json", str(HERE / file)]
    if read_write:
        argv.append("--read-write-mode")
    for name, value in sorted(args.items()):
        argv += ["--argstr", name, value]
    return json.loads(run(argv))


def module(lib: str, name: str) -> dict[str, Any]:
    return evaluate("eval-module.nix", libPath=lib, name=name)


def test_service_talks_to_the_nix_daemon_as_its_own_user(lib: str) -> None:
    ev = module(lib, "defaults")
    assert ev["failedAssertions"] == []
    service = ev["service"]
    assert service["requires"] == ["nix-daemon.socket"]
    assert "nix-daemon.socket" in service["after"]
    assert service["wantedBy"] == ["multi-user.target"]
    assert service["environment"] == {"NIX_REMOTE": "daemon", "HOME": "/var/lib/nixery"}
    config = service["serviceConfig"]
    assert (config["User"], config["Group"]) == ("nixery", "nixery")
    assert "DynamicUser" not in config
    assert ev["users"]["nixery"] == {
        "isSystemUser": True,
        "group": "nixery",
        "home": "/var/lib/nixery",
        "description": "Nixery container registry",
    }
    assert ev["groups"] == {"nixery": {}}
    # Added to the daemon's users without dropping its default of everyone.
    assert ev["nixSettings"] == {"allowed-users": ["*"], "extra-allowed-users": ["nixery"]}
    assert config["StateDirectory"] == "nixery"
    assert config["CacheDirectory"] == "nixery"
    assert config["Restart"] == "on-failure"


def test_service_is_hardened(lib: str) -> None:
    config = module(lib, "defaults")["service"]["serviceConfig"]
    assert config["ProtectSystem"] == "strict"
    assert config["ProtectHome"] is True
    assert config["PrivateTmp"] is True
    assert config["NoNewPrivileges"] is True
    assert config["RestrictAddressFamilies"] == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert config["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert config["CapabilityBoundingSet"] == [""]
    assert config["AmbientCapabilities"] == []
    assert config["UMask"] == "0027"


def test_service_serves_the_checked_config_file(lib: str) -> None:
    ev = module(lib, "defaults")
    assert ev["configFile"] == CHECKED
    assert ev["renderedFile"] == RENDERED
    assert ev["service"]["serviceConfig"]["ExecStart"] == (
        f"{PACKAGE}/bin/nixery serve --config {CHECKED}"
    )
    assert ev["checkInputs"] == [PACKAGE]
    assert ev["checkCommand"].splitlines() == [
        'nixery check-config "$unchecked"',
        'cp "$unchecked" "$out"',
    ]


def test_default_source_is_the_systems_nixpkgs(lib: str) -> None:
    assert module(lib, "defaults")["settings"] == {
        "host": "0.0.0.0",
        "port": 8080,
        "default-pkgs-path": NIXPKGS,
        "gc-roots-dir": "/var/lib/nixery/gc-roots",
        "storage-backend": "filesystem",
        "storage-path": "/var/cache/nixery",
    }


def test_every_option_reaches_the_config_file(lib: str) -> None:
    ev = module(lib, "full")
    assert ev["failedAssertions"] == []
    assert ev["settings"] == {
        "host": "127.0.0.1",
        "port": 8443,
        "gc-roots-dir": "/var/lib/nixery/gc-roots",
        "pkgs-path": "/srv/nixery/packages",
        "overlay": ["/srv/nixery/overlay.nix"],
        "storage-backend": "filesystem",
        "storage-path": "/srv/nixery/cache",
        "popularity": "https://example.org/popularity.json",
        "nix-timeout": 300,
        "layer-budget": 60,
        "platforms": "linux/amd64,linux/arm64",
        "compression-level": 2,
        "log-level": "debug",
    }
    assert ev["firewall"] == [8443]
    assert ev["tmpfiles"] == ["d /srv/nixery/cache 0750 nixery nixery - -"]
    config = ev["service"]["serviceConfig"]
    assert config["ReadWritePaths"] == ["/srv/nixery/cache"]
    assert "CacheDirectory" not in config
    assert config["EnvironmentFile"] == "/run/secrets/nixery.env"
    assert ev["checkCommand"].startswith('nixery check-config --syntax-only "$unchecked"\n')


def test_newer_daemon_options_and_s3_credentials(lib: str) -> None:
    ev = module(lib, "s3")
    assert ev["failedAssertions"] == []
    assert ev["settings"] == {
        "host": "0.0.0.0",
        "port": 8080,
        "flake": "github:example/packages",
        "gc-roots-dir": "/var/lib/nixery/gc-roots",
        "max-builds": 4,
        "storage-backend": "s3",
        "s3-bucket": "images",
        "s3-endpoint": "https://s3.example.org",
        "s3-region": "eu-west-1",
        "s3-path-style": True,
    }
    service = ev["service"]
    # The secret stays outside the store and the unit: systemd passes it in.
    assert service["serviceConfig"]["LoadCredential"] == ["s3-credentials:/run/secrets/nixery-s3"]
    assert service["environment"]["AWS_SHARED_CREDENTIALS_FILE"] == "%d/s3-credentials"
    assert "/run/secrets" not in json.dumps(ev["settings"])


def test_gc_timer_collects_the_storage_the_registry_serves(lib: str) -> None:
    from nixery.cli import gc

    defaults = module(lib, "defaults")
    assert defaults["gcService"] is None and defaults["gcTimer"] is None
    gc_options = {opt for param in gc.params for opt in param.opts}
    cases = {
        "full": (
            "--keep-days 30 --grace 3600 --storage-backend filesystem "
            "--storage-path /srv/nixery/cache",
            "daily",
        ),
        "s3": (
            "--keep-days 7 --grace 1800 --storage-backend s3 --s3-bucket images "
            "--s3-endpoint https://s3.example.org --s3-region eu-west-1 --s3-path-style",
            "hourly",
        ),
    }
    for name, (arguments, dates) in cases.items():
        ev = module(lib, name)
        service, timer = ev["gcService"], ev["gcTimer"]
        config = service["serviceConfig"]
        assert config["ExecStart"] == f"{PACKAGE}/bin/nixery gc {arguments}"
        # Every flag is one `nixery gc` takes.
        assert {a for a in arguments.split() if a.startswith("--")} <= gc_options
        assert config["Type"] == "oneshot"
        # The registry's user, storage access, secrets and hardening.
        served = ev["service"]["serviceConfig"]
        for key in ("User", "Group", "ReadWritePaths", "CacheDirectory", "EnvironmentFile",
                    "LoadCredential", "ProtectSystem", "SystemCallFilter", "UMask"):  # fmt: skip
            assert config.get(key) == served.get(key), key
        assert {k: v for k, v in ev["service"]["environment"].items() if k != "NIX_REMOTE"} == (
            service["environment"]
        )
        assert timer["wantedBy"] == ["timers.target"]
        assert timer["timerConfig"]["OnCalendar"] == dates
        assert timer["timerConfig"]["Persistent"] is True


def test_privileged_port_gets_only_the_bind_capability(lib: str) -> None:
    ev = module(lib, "privilegedPort")
    config = ev["service"]["serviceConfig"]
    assert config["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert config["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert ev["settings"]["channel"] == "nixos-24.11"
    assert "default-pkgs-path" not in ev["settings"]


def test_check_can_be_turned_off(lib: str) -> None:
    ev = module(lib, "unchecked")
    assert ev["checkCommand"] is None
    assert ev["configFile"] == RENDERED
    assert ev["service"]["serviceConfig"]["ExecStart"].endswith(f"--config {RENDERED}")


def test_disabled_module_sets_nothing(lib: str) -> None:
    ev = module(lib, "disabled")
    assert ev["service"] is None
    assert (ev["users"], ev["groups"], ev["firewall"]) == ({}, {}, [])
    assert ev["nixSettings"] == {"allowed-users": ["*"]}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("twoSources", "set at most one of channel, pkgsRepo, pkgsPath and flake; set: channel"),
        ("secretInStore", "must not be in the world-readable Nix store"),
        ("s3WithoutBucket", 'storage.backend = "s3" needs storage.s3.bucket'),
    ],
)
def test_assertions(lib: str, name: str, message: str) -> None:
    [failed] = module(lib, name)["failedAssertions"]
    assert message in failed


@pytest.mark.parametrize("name", ["defaults", "full"])
def test_checked_in_config_files_match_the_module(lib: str, name: str) -> None:
    # tests/test_config_file.py runs the CLI on these files; they must stay
    # what the module renders.
    golden = tomllib.loads((HERE / f"{name}.toml").read_text())
    assert golden == module(lib, name)["settings"]


def canonical(requirement: str) -> str:
    name = re.match(r"\s*([A-Za-z0-9._-]+)", requirement)
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def test_package_expression(lib: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [canonical(r) for r in project["dependencies"]]
    test_only = [
        canonical(r)
        for r in project.get("optional-dependencies", {}).get("test", [])
        if canonical(r) not in ("pytest", "ruff", "mypy", "import-linter")
    ]
    expected = [*runtime, *test_only, "setuptools", "pytestCheckHook"]
    package = evaluate("eval-package.nix", libPath=lib, expectedJSON=json.dumps(expected))
    assert package["pname"] == "nixery"
    assert package["version"] == project["version"]
    assert package["pyproject"] is True
    assert package["dependencies"] == [f"python3Packages.{n}" for n in runtime]
    # git: the unit tests of git sources run the real git.
    assert package["nativeCheckInputs"] == [
        "python3Packages.pytestCheckHook",
        f"{STUB_STORE}git",
        *(f"python3Packages.{n}" for n in test_only),
    ]
    assert package["makeWrapperArgs"] == [
        "--prefix",
        "PATH",
        ":",
        f"{STUB_STORE}nix/bin:{STUB_STORE}git/bin",
    ]
    assert package["meta"]["mainProgram"] == "nixery"
    assert "nixery/packages/nixexprs/resolve.nix" in package["postInstall"]
    assert package["pytestFlagsArray"] == ["-m", UNIT_TESTS]


def test_unit_test_selection_needs_no_nix_and_no_clients() -> None:
    listed = run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", UNIT_TESTS, str(ROOT)]
    )
    files = {line.split("::")[0] for line in listed.splitlines() if "::" in line}
    assert "tests/test_names.py" in files
    assert "tests/test_config_file.py" in files
    for needs_more in ("tests/test_nix.py", "tests/test_e2e_pull.py", "tests/test_http_errors.py"):
        assert needs_more not in files
    assert not any("test_nixos_module" in f for f in files)
    assert "test_server_started_from_the_module_file" not in listed


def test_flake_outputs(lib: str) -> None:
    flake = evaluate("eval-flake.nix", read_write=True, libPath=lib)
    assert flake["inputs"] == "github:NixOS/nixpkgs/nixos-unstable"
    assert flake["outputs"]["nixosModules"] == ["default", "nixery"]
    assert flake["outputs"]["overlays"] == ["default"]
    for system in ("x86_64-linux", "aarch64-linux"):
        outputs = flake["perSystem"][system]
        assert outputs["packages"] == ["default", "image", "nixery"]
        assert outputs["apps"] == ["default"]
        assert outputs["devShells"] == ["default"]
        vm_tests = {f"vm-{p.stem}" for p in (ROOT / "nix" / "tests").glob("*.nix")}
        assert set(outputs["checks"]) == {"package", "lint"} | vm_tests
    assert flake["package"] == str(ROOT / "nix" / "pkgs" / "nixery.nix")
    assert flake["overlayPackage"] == flake["package"]
    assert flake["formatter"] == "nixfmt"
    assert {"nix", "git", "skopeo", "pytest", "ruff"} <= set(flake["devShellPackages"])
    assert "ruff check" in flake["lintCommand"] and "ruff format" in flake["lintCommand"]


def test_nix_run_serves_the_flakes_nixpkgs_unless_told_otherwise(lib: str) -> None:
    app = evaluate("eval-flake.nix", read_write=True, libPath=lib)["app"]
    assert app["type"] == "app"
    assert app["program"].endswith("/bin/nixery-serve")
    assert app["text"] == f'exec {PACKAGE}/bin/nixery serve --default-pkgs-path {NIXPKGS} "$@"\n'


def test_vm_test_machine(lib: str) -> None:
    vm = evaluate("eval-flake.nix", read_write=True, libPath=lib)["vm"]
    assert vm["failedAssertions"] == []
    assert vm["settings"]["pkgs-path"] == STUB_STORE + "nixery-test-packages.nix"
    assert vm["execStart"] == f"{PACKAGE}/bin/nixery serve --config {CHECKED}"
    # Every package of `shell/hello` is in the VM's store, so nothing is built.
    wanted = {"hello", "bashInteractive", "coreutils", "moreutils", "nano", "cacert", "iana-etc"}
    assert set(vm["additionalPaths"]) == wanted
    assert f"import {NIXPKGS} " in vm["packageSet"]
    assert all(name in vm["packageSet"] for name in wanted)
    script = vm["testScript"]
    assert "wait_for_open_port(8080)" in script
    assert "docker://127.0.0.1:8080/shell/hello" in script
    assert "podman run" in script and "hello" in script


# Module option -> (the `nixery` command that reads it, its long option).
NUMERIC_OPTIONS = {
    ("port",): ("serve", "--port"),
    ("layerBudget",): ("serve", "--layer-budget"),
    ("nixTimeout",): ("serve", "--nix-timeout"),
    ("maxBuilds",): ("serve", "--max-builds"),
    ("gc", "keepDays"): ("gc", "--keep-days"),
    ("gc", "grace"): ("gc", "--grace"),
}


def boundary_values(kind: click.ParamType) -> list[int | float]:
    """Values on and beside the bounds of a click number range."""
    assert isinstance(kind, click.IntRange | click.FloatRange), kind
    low = kind.min if kind.min is not None else -1000
    high = kind.max if kind.max is not None else low + 100000
    values: list[int | float] = [low - 1, low, high, high + 1]
    if isinstance(kind, click.FloatRange):
        values += [low + 0.5, low - 0.5]
    return values


def daemon_accepts(command: str, option: str, value: float, tmp_path: Path) -> bool:
    """What `nixery serve --config` (through `check-config`) or `nixery gc` makes of it."""
    from nixery import configfile
    from nixery.cli import gc, serve
    from nixery.config import Settings
    from nixery.errors import ConfigError

    if command == "serve":
        file = tmp_path / f"{option[2:]}-{value}.toml"
        file.write_text(f"{option[2:]} = {value!r}\n")
        try:
            configfile.check(serve, str(file), Settings.from_options, syntax_only=True)
        except ConfigError:
            return False
        return True
    [param] = [p for p in gc.params if option in p.opts]
    try:
        param.type.convert(value, param, None)
    except click.BadParameter:
        return False
    return True


def test_module_options_accept_exactly_what_the_daemon_accepts(lib: str, tmp_path: Path) -> None:
    from nixery.cli import gc, serve

    commands = {"serve": serve, "gc": gc}
    probes: list[dict[str, Any]] = []
    for path, (command, option) in NUMERIC_OPTIONS.items():
        [param] = [p for p in commands[command].params if option in p.opts]
        probes += [{"option": list(path), "value": v} for v in boundary_values(param.type)]
    argv = ["nix-instantiate", "--eval", "--strict", "--json", str(HERE / "eval-option-values.nix"),
            "--argstr", "libPath", lib, "--argstr", "probesJSON", json.dumps(probes)]  # fmt: skip
    module_accepts = json.loads(run(argv))
    differ = []
    for probe, accepted in zip(probes, module_accepts, strict=True):
        command, option = NUMERIC_OPTIONS[tuple(probe["option"])]
        expected = daemon_accepts(command, option, probe["value"], tmp_path)
        if accepted != expected:
            differ.append(f"{'.'.join(probe['option'])} = {probe['value']}: module {accepted}, "
                          f"nixery {command} {expected}")  # fmt: skip
    assert not differ, "\n".join(differ)
