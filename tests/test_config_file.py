"""`serve --config FILE` and `check-config FILE`, including the files the NixOS
module renders (tests/nixos/*.toml)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from nixery import configfile
from nixery.cli import main, serve
from nixery.config import Settings
from nixery.packages.sources import SourceConfig
from tests.conftest import FIXTURE_PKGS, StartServer
from tests.http import call

MODULE_FILES = Path(__file__).parent / "nixos"
OCI = "application/vnd.oci.image.manifest.v1+json"


def write(tmp_path: Path, text: str, name: str = "nixery.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def check_config(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["check-config", *map(str, args)])


def serve_options(*args: str) -> dict:
    """What `serve` would run with, parsed by click exactly as at start-up."""
    return serve.make_context("serve", list(args)).params


@pytest.mark.parametrize("name", ["defaults", "full"])
def test_module_rendered_files_pass_the_syntax_check(name: str) -> None:
    result = check_config("--syntax-only", MODULE_FILES / f"{name}.toml")
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(": ok")


def test_full_check_names_the_files_the_build_cannot_see() -> None:
    # Outside a NixOS host these paths do not exist: that is what
    # `checkConfig = "syntax-only"` is for.
    result = check_config(MODULE_FILES / "full.toml")
    assert result.exit_code == 1
    assert "'/srv/nixery/overlay.nix' does not exist" in result.output

    result = check_config(MODULE_FILES / "defaults.toml")
    assert result.exit_code == 1
    assert "package set path /nix/store/00000000000000000000000000000000-nixpkgs-source" in (
        result.output
    )


def test_module_rendered_file_configures_serve() -> None:
    options = serve_options("--config", str(MODULE_FILES / "defaults.toml"))
    assert options["host"] == "0.0.0.0"
    assert options["port"] == 8080
    assert options["storage_backend"] == "filesystem"
    assert options["storage_path"] == "/var/cache/nixery"
    assert options["gc_roots_dir"] == "/var/lib/nixery/gc-roots"
    assert options["default_pkgs_path"] == (
        "/nix/store/00000000000000000000000000000000-nixpkgs-source"
    )
    assert options["pkgs_path"] is None


def test_valid_file_passes_the_full_check(tmp_path: Path) -> None:
    overlay = write(tmp_path, "final: prev: { }\n", "overlay.nix")
    path = write(
        tmp_path,
        f'port = 9000\npkgs-path = "{FIXTURE_PKGS}"\noverlay = ["{overlay}"]\n'
        'platforms = "linux/amd64,linux/arm64"\nnix_timeout = 30.5\n',
    )
    result = check_config(path)
    assert result.exit_code == 0, result.output
    assert result.output == f"{path}: ok\n"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 70000\nlayer-budget = 0\nstorage-backend = "tape"\n')
    result = check_config(path)
    assert result.exit_code == 1
    assert "Invalid value for '--port': 70000 is not in the range 0<=x<=65535" in result.output
    assert "Invalid value for '--layer-budget': 0 is not in the range 1<=x<=124" in result.output
    assert "'tape' is not 'filesystem'" in result.output or "'tape' is not one of" in (
        result.output
    )


def test_unknown_keys_and_wrong_shapes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'prot = 1\nport = [1, 2]\nhost = { a = 1 }\npkgs-path = "/a"\npkgs_path = "/b"\n',
    )
    result = check_config(path)
    assert result.exit_code == 1
    for expected in (
        "unknown option 'prot'",
        "option 'port' takes one value, not a list",
        "option 'host' takes a value, not a table",
        "option 'pkgs_path' is given twice",
        "known options: ",
    ):
        assert expected in result.output
    # `serve` reads the file the same way and refuses to start.
    result = CliRunner().invoke(main, ["serve", "--config", str(path)])
    assert result.exit_code == 2
    assert "unknown option 'prot'" in result.output


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    result = check_config(tmp_path / "missing.toml")
    assert result.exit_code == 1
    assert "cannot read" in result.output and "No such file or directory" in result.output

    result = check_config(write(tmp_path, "port = \n"))
    assert result.exit_code == 1
    assert "is not valid TOML" in result.output


def test_cross_option_checks_run_unless_syntax_only(tmp_path: Path) -> None:
    path = write(tmp_path, f'channel = "nixos-24.11"\npkgs-path = "{FIXTURE_PKGS}"\n')
    result = check_config(path)
    assert result.exit_code == 1
    assert "configure only one package source, got: path, channel" in result.output
    assert check_config("--syntax-only", path).exit_code == 0

    bad_platform = write(tmp_path, 'platforms = "linux/s390x"\n', "platforms.toml")
    result = check_config(bad_platform)
    assert result.exit_code == 1
    assert "unsupported platform 'linux/s390x'" in result.output


def test_the_environment_does_not_hide_the_files_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIXERY_PORT", "not-a-port")
    monkeypatch.setenv("NIXERY_CONFIG", str(tmp_path / "elsewhere.toml"))
    assert check_config("--syntax-only", write(tmp_path, "port = 8080\n")).exit_code == 0
    monkeypatch.setenv("NIXERY_PORT", "8080")
    result = check_config("--syntax-only", write(tmp_path, "port = -1\n", "bad.toml"))
    assert result.exit_code == 1
    assert "-1 is not in the range" in result.output


def test_options_added_to_serve_are_checked_without_changes(tmp_path: Path) -> None:
    # A command with one more option than `serve`, as new features add them.
    command = click.Command(
        "serve",
        params=[
            *serve.params,
            click.Option(["--max-widgets"], type=click.IntRange(min=1), default=4),
        ],
    )
    seen: list[dict] = []
    configfile.check(command, str(write(tmp_path, "max-widgets = 2\n")), seen.append)
    assert seen[0]["max_widgets"] == 2
    with pytest.raises(configfile.ConfigError, match="0 is not in the range x>=1"):
        configfile.check(command, str(write(tmp_path, "max_widgets = 0\n")), seen.append)


def test_precedence_flag_then_environment_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(write(tmp_path, 'host = "10.0.0.1"\nport = 9000\nlayer-budget = 50\n'))
    monkeypatch.setenv("NIXERY_HOST", "10.0.0.2")
    options = serve_options("--config", path, "--port", "9001")
    assert options["port"] == 9001
    assert options["host"] == "10.0.0.2"
    assert options["layer_budget"] == 50
    assert options["compression_level"] == 1


def test_overlay_key_takes_one_file_or_a_list(tmp_path: Path) -> None:
    overlay = write(tmp_path, "final: prev: { }\n", "overlay.nix")
    one = write(tmp_path, f'overlay = "{overlay}"\n', "one.toml")
    assert list(serve_options("--config", str(one))["overlays"]) == [str(overlay)]
    two = write(tmp_path, f'overlay = ["{overlay}", "{overlay}"]\n', "two.toml")
    assert list(serve_options("--config", str(two))["overlays"]) == [str(overlay)] * 2


def test_overlay_may_be_a_directory_with_a_default_nix(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "default.nix").write_text("final: prev: import ./packages.nix final\n")
    (overlay / "packages.nix").write_text("final: { }\n")
    config = write(tmp_path, f'pkgs-path = "{FIXTURE_PKGS}"\noverlay = ["{overlay}"]\n')
    result = check_config(config)
    assert result.exit_code == 0, result.output
    settings = Settings.from_options(serve_options("--config", str(config)))
    assert settings.overlays == (str(overlay),)

    (overlay / "default.nix").unlink()
    result = check_config(config)
    assert result.exit_code == 1
    assert f"overlay directory {overlay} has no default.nix" in result.output


def options_for(tmp_path: Path, **given: str) -> dict:
    path = write(tmp_path, "".join(f'{k} = "{v}"\n' for k, v in given.items()), "src.toml")
    return serve_options("--config", str(path))


def test_default_pkgs_path_applies_only_without_a_source(tmp_path: Path) -> None:
    default = str(FIXTURE_PKGS)
    settings = Settings.from_options(options_for(tmp_path, **{"default-pkgs-path": default}))
    assert settings.source == SourceConfig("path", default)

    settings = Settings.from_options(
        options_for(tmp_path, **{"default-pkgs-path": default, "channel": "nixos-24.11"})
    )
    assert settings.source == SourceConfig("channel", "nixos-24.11")

    settings = Settings.from_options(
        options_for(tmp_path, **{"default-pkgs-path": "/nonexistent", "pkgs-path": default})
    )
    assert settings.source == SourceConfig("path", default)

    settings = Settings.from_options(options_for(tmp_path))
    assert settings.source == SourceConfig("channel", "nixos-unstable")


@pytest.mark.e2e
def test_server_started_from_the_module_file_builds_from_the_default_source(
    start_server: StartServer,
) -> None:
    # What the module runs with the system's nixpkgs as the default source,
    # with the fixture package set standing in for nixpkgs.
    server = start_server(
        "--config",
        str(MODULE_FILES / "defaults.toml"),
        "--default-pkgs-path",
        str(FIXTURE_PKGS),
    )
    reply = call(server.host, "GET", "/v2/hello/manifests/latest", {"Accept": OCI})
    assert reply.status == 200, reply.body
    assert reply.json()["mediaType"] == OCI
