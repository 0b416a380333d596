"""End to end: package sources configured on the command line, pulled by
real clients from the real server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.clients import bwrap_run, skopeo_copy, umoci_unpack
from tests.conftest import Server, StartServer, require
from tests.http import Reply, call
from tests.sourcefixtures import channel_server, copy_package_set, make_pkgs_repo, tarball

pytestmark = pytest.mark.e2e

OCI = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def get_manifest(server: Server, name: str, tag: str) -> Reply:
    return call(server.host, "GET", f"/v2/{name}/manifests/{tag}", OCI)


def evaluations(server: Server) -> int:
    return server.log_text().count("running ['nix-instantiate'")


def test_git_repository_tags(start_server: StartServer, tmp_path: Path) -> None:
    require("skopeo", "umoci", "bwrap")
    repo = make_pkgs_repo(tmp_path / "pkgs")
    server = start_server(
        "--pkgs-repo", repo.url, "--source-cache", str(tmp_path / "cache"), "--log-level", "debug"
    )
    skopeo_copy(server.host, "shell/hello:v1", tmp_path / "oci")
    rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
    assert bwrap_run(rootfs, "hello").strip() == "Hello, world!"
    assert any(p.name.endswith("-hello-2.10") for p in (rootfs / "nix/store").iterdir())

    v1, v2 = get_manifest(server, "shell/hello", "v1"), get_manifest(server, "shell/hello", "v2")
    assert v1.status == v2.status == 200
    assert v1.header("Docker-Content-Digest") != v2.header("Docker-Content-Digest")
    latest = get_manifest(server, "shell/hello", "latest")
    assert latest.header("Docker-Content-Digest") == v2.header("Docker-Content-Digest")

    before = evaluations(server)
    missing = get_manifest(server, "shell/hello", "v9")
    assert missing.status == 404
    assert missing.error_codes() == ["MANIFEST_UNKNOWN"]
    assert get_manifest(server, "shell/hello", "v1").status == 200
    assert evaluations(server) == before


def test_channel_options(start_server: StartServer, tmp_path: Path) -> None:
    commits = {}
    with channel_server() as channels:
        for version in ("2.10", "2.12"):
            pkgs = copy_package_set(tmp_path / version, version)
            commit = hashlib.sha1(version.encode()).hexdigest()
            channels.tarballs[commit] = tarball(pkgs, f"nixpkgs-{commit}")
            commits[version] = commit
        channels.revisions["nixos-test"] = commits["2.10"]
        channels.revisions["nixos-next"] = commits["2.12"]
        server = start_server(
            "--channel", "nixos-test",
            "--channel-url", channels.tarball_url,
            "--channel-revision-url", channels.revision_url,
            "--allow-tag-versions",
            "--source-cache", str(tmp_path / "cache"),
        )  # fmt: skip
        latest = get_manifest(server, "hello", "latest")
        by_commit = get_manifest(server, "hello", commits["2.10"])
        next_channel = get_manifest(server, "hello", "nixos-next")
        assert latest.status == by_commit.status == next_channel.status == 200
        assert latest.body == by_commit.body != next_channel.body
        assert get_manifest(server, "hello", "nixos-gone").error_codes() == ["MANIFEST_UNKNOWN"]
        assert get_manifest(server, "hello", "v1").error_codes() == ["MANIFEST_UNKNOWN"]
        assert channels.count(".tar.gz") == 2


def test_flake_option(start_server: StartServer, tmp_path: Path) -> None:
    repo = make_pkgs_repo(tmp_path / "pkgs")
    server = start_server("--flake", f"git+{repo.url}")
    v1, latest = get_manifest(server, "hello", "v1"), get_manifest(server, "hello", "latest")
    assert v1.status == latest.status == 200
    assert v1.body != latest.body
