"""`nixery build`: images without a server, checked with real tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.clients import bwrap_run, run, umoci_unpack
from tests.conftest import FIXTURE_PKGS, require

pytestmark = pytest.mark.e2e


def nixery_build(*args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "nixery", "build", "--pkgs-path", str(FIXTURE_PKGS),
            "--storage-path", str(cache), *args]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def podman(root: Path, *args: str) -> str:
    argv = ["podman", "--root", str(root / "root"), "--runroot", str(root / "run"),
            "--storage-driver", "overlay", *args]  # fmt: skip
    return run(argv).stdout


def test_oci_layout_unpacks_and_runs(tmp_path: Path) -> None:
    require("umoci", "bwrap")
    out = tmp_path / "layout"
    proc = nixery_build("shell/hello", "--output", str(out), cache=tmp_path / "cache")
    assert proc.stdout.strip() == str(out)
    # Not a terminal: the progress is plain lines.
    assert "nixery: shell/hello:latest for linux/amd64: evaluating" in proc.stderr
    assert "nixery: packing" in proc.stderr and "nixery: built in" in proc.stderr
    assert json.loads((out / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}

    rootfs = umoci_unpack(out, tmp_path / "bundle")
    assert bwrap_run(rootfs, "hello").strip() == "Hello, world!"
    assert "bash" in bwrap_run(rootfs, "bash", "-c", "ls /bin")

    # The same image again comes from the cache; another under the same tag replaces it.
    again = nixery_build("shell/hello:latest", "--output", str(out), cache=tmp_path / "cache")
    assert "shell/hello:latest for linux/amd64 is in the cache" in again.stderr
    nixery_build("curl", "--output", str(out), cache=tmp_path / "cache")
    index = json.loads((out / "index.json").read_text())
    refs = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert refs == ["latest"]
    curl = umoci_unpack(out, tmp_path / "curl")
    assert "curl" in bwrap_run(curl, "curl", "--version")
    assert not (curl / "bin" / "hello").exists()


def test_archives_load_into_podman_and_run(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    require("podman", "runc")
    cache = tmp_path / "cache"
    docker = tmp_path / "docker.tar"
    oci = tmp_path / "oci.tar"
    nixery_build("shell/hello", "--format", "docker-archive", "--output", str(docker), cache=cache)
    nixery_build("hello", "--format", "oci-archive", "--output", str(oci), cache=cache)
    with tarfile.open(docker) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == ["localhost/shell/hello:latest"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left

    # podman refuses a runroot path longer than 50 characters.
    store = Path(tempfile.mkdtemp(prefix="nxp-", dir="/tmp"))

    def cleanup() -> None:
        podman(store, "system", "reset", "--force")  # unmounts what overlay mounted
        shutil.rmtree(store, ignore_errors=True)

    request.addfinalizer(cleanup)
    assert "localhost/shell/hello:latest" in podman(store, "load", "-i", str(docker))
    assert "localhost/hello:latest" in podman(store, "load", "-i", str(oci))
    names = podman(store, "images", "--format", "{{.Repository}}:{{.Tag}}").split()
    assert sorted(names) == ["localhost/hello:latest", "localhost/shell/hello:latest"]
    out = podman(
        store, "run", "--rm", "--runtime", "runc", "--network", "none",
        "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
        "localhost/shell/hello:latest", "bash", "-c", "hello && ls /etc/ssl/certs",
    )  # fmt: skip
    assert "Hello, world!" in out and "ca-bundle.crt" in out


def test_unknown_package_fails_with_a_suggestion(tmp_path: Path) -> None:
    proc = nixery_build("shell/helo", "--output", str(tmp_path / "x"), cache=tmp_path, check=False)
    assert proc.returncode == 1
    assert "unknown packages: helo" in proc.stderr
    assert "helo: did you mean hello?" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_tag_the_source_cannot_serve_is_explained(tmp_path: Path) -> None:
    proc = nixery_build("hello:v1", "--output", str(tmp_path / "x"), cache=tmp_path, check=False)
    assert proc.returncode == 1
    assert "serves only the tag 'latest'" in proc.stderr


def test_build_failure_shows_the_nix_log(tmp_path: Path) -> None:
    proc = nixery_build("broken", "--output", str(tmp_path / "x"), cache=tmp_path, check=False)
    assert proc.returncode == 1
    assert "broken on purpose" in proc.stderr


@pytest.mark.parametrize("fmt", ["oci", "docker-archive"])
def test_sbom_is_written_next_to_the_output(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / ("layout" if fmt == "oci" else "image.tar")
    proc = nixery_build(
        "shell/hello", "--format", fmt, "--output", str(out), "--sbom", cache=tmp_path / "cache"
    )
    spdx, cyclonedx = Path(f"{out}.spdx.json"), Path(f"{out}.cdx.json")
    assert proc.stdout.split() == [str(out), str(spdx), str(cyclonedx)]
    # The files describe the manifest written, the one the store paths are packed in.
    if fmt == "oci":
        [entry] = json.loads((out / "index.json").read_text())["manifests"]
        manifest = entry["digest"]
        blobs = out / "blobs" / "sha256"
        layers = json.loads((blobs / manifest[7:]).read_text())["layers"]
    else:
        with tarfile.open(out) as tar:
            config_name = json.load(tar.extractfile("manifest.json"))[0]["Config"]  # type: ignore[arg-type]
            config = json.load(tar.extractfile(config_name))  # type: ignore[arg-type]
        manifest = None
        layers = config["rootfs"]["diff_ids"]
    described = json.loads(spdx.read_text())
    image = next(p for p in described["packages"] if p["SPDXID"] == "SPDXRef-Image")
    if manifest is not None:
        assert image["versionInfo"] == manifest
    else:
        assert image["comment"].endswith("(application/vnd.docker.distribution.manifest.v2+json)")
    assert len(layers) > 1
    paths = [p["packageFileName"] for p in described["packages"] if "packageFileName" in p]
    assert any(p.endswith("-hello-2.10") for p in paths) and len(paths) == len(set(paths))
    components = json.loads(cyclonedx.read_text())["components"]
    assert sorted(c["bom-ref"] for c in components) == sorted(paths)
    # Without --sbom, nothing is written next to it.
    plain = tmp_path / "plain"
    nixery_build("shell/hello", "--output", str(plain), cache=tmp_path / "cache")
    assert not Path(f"{plain}.spdx.json").exists()
