"""End to end: the real server, real Nix, real clients."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.clients import bwrap_run, skopeo_copy, skopeo_inspect, umoci_unpack
from tests.conftest import Server, StartServer, require

pytestmark = pytest.mark.e2e


def manifest(server: Server, name: str, accept: str) -> tuple[dict, dict[str, str]]:
    req = urllib.request.Request(
        f"{server.url}/v2/{name}/manifests/latest", headers={"Accept": accept}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp), dict(resp.headers)


def test_skopeo_pull_unpack_and_run(server: Server, tmp_path: Path) -> None:
    require("skopeo", "umoci", "bwrap")
    skopeo_copy(server.host, "shell/hello", tmp_path / "oci")
    rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")

    assert bwrap_run(rootfs, "hello").strip() == "Hello, world!"
    listing = bwrap_run(rootfs, "bash", "-c", "ls /bin").split()
    assert {"bash", "ls", "hello", "cat"} <= set(listing)
    assert bwrap_run(rootfs, "/usr/bin/env", "true") == ""
    bundle = bwrap_run(rootfs, "cat", "/etc/ssl/certs/ca-bundle.crt")
    assert "BEGIN CERTIFICATE" in bundle
    assert "root:x:0:0" in (rootfs / "etc/passwd").read_text()
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777


def test_config_describes_the_image(server: Server) -> None:
    require("skopeo")
    config = skopeo_inspect(server.host, "shell/hello", raw=False)
    assert config["Architecture"] == "amd64"
    raw = skopeo_inspect(server.host, "shell/hello", raw=True)
    assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert all(layer["mediaType"].endswith("tar+gzip") for layer in raw["layers"])


def test_package_order_does_not_matter(server: Server) -> None:
    oci = "application/vnd.oci.image.manifest.v1+json"
    a, _ = manifest(server, "hello/shell", oci)
    b, _ = manifest(server, "shell/hello", oci)
    assert a == b


def test_same_image_twice_has_same_digests_and_packs_nothing(
    start_server: StartServer, tmp_path: Path
) -> None:
    oci = "application/vnd.oci.image.manifest.v1+json"
    first = start_server()
    body1, headers1 = manifest(first, "shell/hello", oci)
    first.stop()
    # A fresh store: every layer is packed again, and must come out identical.
    fresh = start_server()
    body2, headers2 = manifest(fresh, "shell/hello", oci)
    assert body1 == body2
    assert headers1["Docker-Content-Digest"] == headers2["Docker-Content-Digest"]

    # Same store after a restart: the unchanged package set's stored image is
    # served as it is, without building or packing anything.
    fresh.stop()
    again = start_server(storage=fresh.storage)
    blobs_before = sorted(p.name for p in (fresh.storage / "blobs/sha256").iterdir())
    body3, _ = manifest(again, "shell/hello", oci)
    blobs_after = sorted(p.name for p in (fresh.storage / "blobs/sha256").iterdir())
    assert body3 == body1
    assert blobs_before == blobs_after
    assert "built " not in again.log_text()


def test_docker_client_gets_schema2(server: Server) -> None:
    body, headers = manifest(
        server, "hello", "application/vnd.docker.distribution.manifest.v2+json"
    )
    assert body["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert headers["Content-Type"] == body["mediaType"]
    assert body["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
