"""Options for object storage and remote builders: parsing, validation, and
the builders setting reaching the real Nix."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from nixery.cli import serve
from nixery.config import S3Settings, Settings
from nixery.errors import BuildFailed, ConfigError
from nixery.packages import process
from nixery.packages.nix import ResolvedPackage
from nixery.runtime import make_nix
from tests.conftest import FIXTURE_PKGS


def settings(args: list[str]) -> Settings:
    ctx = serve.make_context("serve", ["--pkgs-path", str(FIXTURE_PKGS), *args])
    return Settings.from_options(ctx.params)


def test_s3_options_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIXERY_STORAGE_BACKEND", "s3")
    monkeypatch.setenv("NIXERY_S3_BUCKET", "layers")
    monkeypatch.setenv("NIXERY_S3_PATH_STYLE", "true")
    monkeypatch.setenv("NIXERY_S3_REDIRECT", "off")
    s = settings(["--s3-endpoint", "http://rgw.local:7480", "--s3-prefix", "/nixery/prod/"])
    assert s.s3 == S3Settings(
        bucket="layers",
        prefix="nixery/prod",
        endpoint="http://rgw.local:7480",
        path_style=True,
        redirect=False,
    )
    assert settings(["--s3-bucket", "other"]).s3 == S3Settings(
        bucket="other", path_style=True, redirect=False
    )


def test_filesystem_backend_has_no_s3_settings() -> None:
    assert settings([]).s3 is None
    assert settings([]).nix_builders is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--storage-backend", "s3"], "needs --s3-bucket"),
        (["--s3-bucket", "b"], "--s3-bucket need --storage-backend s3"),
        (["--blob-base-url", "https://cdn.example"], "--blob-base-url need"),
        (["--storage-backend", "s3", "--s3-bucket", "b", "--s3-endpoint", "rgw:80"], "http(s)"),
        (
            ["--storage-backend", "s3", "--s3-bucket", "b", "--blob-base-url", "ftp://x/"],
            "--blob-base-url must be",
        ),
        (["--storage-backend", "s3", "--s3-bucket", "b", "--s3-prefix", "a/../b"], "prefix"),
    ],
)
def test_inconsistent_s3_options_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings(args)


def fresh_package() -> ResolvedPackage:
    """A derivation never built before, so Nix has to build it somewhere."""
    name = f"nixery-builders-probe-{uuid.uuid4().hex[:12]}"
    expr = (
        f'derivation {{ name = "{name}"; system = builtins.currentSystem; '
        'builder = "/bin/sh"; args = [ "-c" "echo probe > $out" ]; }'
    )
    drv = process.run(["nix-instantiate", "-E", expr]).stdout.strip()
    out = process.run(["nix-store", "--query", "--outputs", drv]).stdout.strip()
    return ResolvedPackage(name, name, drv, out, "out")


@pytest.mark.nix
def test_nix_builders_reach_nix() -> None:
    nix = make_nix(settings(["--nix-builders", "dummy:// x86_64-linux aarch64-linux"]))
    assert nix.extra_options == {"builders": "dummy:// x86_64-linux aarch64-linux"}
    # No local build slots: Nix must hand the build to a configured builder.
    no_local = dataclasses.replace(nix, extra_options={**nix.extra_options, "max-jobs": "0"})
    with pytest.raises(BuildFailed) as remote:
        no_local.realise([fresh_package()])
    assert "on 'dummy://'" in remote.value.log_tail

    without = dataclasses.replace(make_nix(settings([])), extra_options={"max-jobs": "0"})
    with pytest.raises(BuildFailed) as local:
        without.realise([fresh_package()])
    assert "unable to start any build" in local.value.log_tail
