"""Every real client pulls `shell/hello` and, where it has a runtime, runs it.

The matrix runs twice: against a registry serving the host platform only
(clients get a single manifest) and against one serving linux/amd64 and
linux/arm64 (clients get an index and pick amd64). Both servers share one
store, so each platform's image is built once. Each test prints how long
the client took (see them with `pytest -rP`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from hypothesis import HealthCheck, given, settings

from nixery.assembly.manifest import (
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from tests.accept import accept_headers, served_types
from tests.clients import (
    PODMAN_RUN_FLAGS,
    Containerd,
    ContainersTool,
    bwrap_run,
    run,
    skopeo_copy,
    skopeo_inspect,
    umoci_unpack,
)
from tests.conftest import Server, StartServer, require
from tests.http import call

pytestmark = pytest.mark.e2e

IMAGE = "shell/hello"
GREETING = "Hello, world!"
PLATFORMS = {"host": (), "amd64+arm64": ("--platforms", "linux/amd64,linux/arm64")}
T = TypeVar("T")
# Debian 12's docker.io (20.10); another docker build may come first on PATH.
DOCKER_CLI = "/usr/bin/docker"


def timed(label: str, action: Callable[[], T]) -> T:
    started = time.monotonic()
    result = action()
    print(f"{label}: {time.monotonic() - started:.2f}s")
    return result


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clients") / "storage"


@pytest.fixture(scope="module", params=sorted(PLATFORMS))
def platforms(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def multi(platforms: str) -> bool:
    """Whether the registry serves an index to clients that accept one."""
    return platforms != "host"


@pytest.fixture(scope="module")
def registry(platforms: str, start_module_server: StartServer, storage: Path) -> Server:
    server = start_module_server(*PLATFORMS[platforms], storage=storage)
    # Build first, so the clients' times are pull times.
    for accept in (f"{OCI_INDEX}, {OCI_MANIFEST}", OCI_MANIFEST):
        reply = call(server.host, "GET", f"/v2/{IMAGE}/manifests/latest", {"Accept": accept})
        assert reply.status == 200, reply.body
    return server


def test_skopeo_inspect(registry: Server, multi: bool) -> None:
    require("skopeo")
    config = timed("skopeo inspect", lambda: skopeo_inspect(registry.host, IMAGE))
    assert (config["Os"], config["Architecture"]) == ("linux", "amd64")
    raw = skopeo_inspect(registry.host, IMAGE, raw=True)
    assert raw["mediaType"] == (OCI_INDEX if multi else OCI_MANIFEST)
    if multi:
        arm = skopeo_inspect(registry.host, IMAGE, flags=("--override-arch", "arm64"))
        assert (arm["Os"], arm["Architecture"]) == ("linux", "arm64")


def test_skopeo_copy_to_oci_then_umoci_and_bwrap_run(registry: Server, tmp_path: Path) -> None:
    require("skopeo", "umoci", "bwrap")
    timed("skopeo copy oci:", lambda: skopeo_copy(registry.host, IMAGE, tmp_path / "oci"))
    rootfs = timed("umoci unpack", lambda: umoci_unpack(tmp_path / "oci", tmp_path / "bundle"))
    assert timed("bwrap run", lambda: bwrap_run(rootfs, "hello")).strip() == GREETING


def test_skopeo_copy_to_dir(registry: Server, tmp_path: Path) -> None:
    require("skopeo")
    dest = tmp_path / "dir"
    source = f"docker://{registry.host}/{IMAGE}"
    timed(
        "skopeo copy dir:",
        lambda: run(["skopeo", "copy", "--src-tls-verify=false", source, f"dir:{dest}"]),
    )
    manifest = json.loads((dest / "manifest.json").read_text())
    for descriptor in [manifest["config"], *manifest["layers"]]:
        data = (dest / descriptor["digest"].removeprefix("sha256:")).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["digest"]


def test_skopeo_copy_all_platforms(registry: Server, tmp_path: Path, multi: bool) -> None:
    require("skopeo")
    dest = tmp_path / "oci"
    source = f"docker://{registry.host}/{IMAGE}"
    argv = ["skopeo", "copy", "--all", "--src-tls-verify=false", source, f"oci:{dest}:latest"]
    timed("skopeo copy --all", lambda: run(argv))

    def blob(digest: str) -> dict[str, Any]:
        return json.loads((dest / "blobs/sha256" / digest.removeprefix("sha256:")).read_text())

    top = json.loads((dest / "index.json").read_text())["manifests"][0]
    if multi:
        assert top["mediaType"] == OCI_INDEX
        manifests = [entry["digest"] for entry in blob(top["digest"])["manifests"]]
    else:
        assert top["mediaType"] == OCI_MANIFEST
        manifests = [top["digest"]]
    architectures = [blob(blob(m)["config"]["digest"])["architecture"] for m in manifests]
    assert architectures == (["amd64", "arm64"] if multi else ["amd64"])


def test_podman_pull_and_run(registry: Server) -> None:
    require("podman", "runc")
    podman = ContainersTool("podman")
    ref = f"{registry.host}/{IMAGE}"
    try:
        timed("podman pull", lambda: podman("pull", "--quiet", "--tls-verify=false", ref))
        out = timed(
            "podman run",
            lambda: podman("run", "--rm", "--pull=never", *PODMAN_RUN_FLAGS, ref, "hello"),
        )
        assert out.strip() == GREETING
        # A login shell as root: HOME comes from /etc/passwd and must be usable.
        script = "cd && touch .probe && echo $HOME $(id -un)"
        login = podman("run", "--rm", "--pull=never", *PODMAN_RUN_FLAGS, ref, "bash", "-lc", script)
        assert login.split() == ["/root", "root"]
        image = json.loads(podman("image", "inspect", ref))[0]
        assert (image["Os"], image["Architecture"]) == ("linux", "amd64")
    finally:
        podman.close()


def test_buildah_from_and_run(registry: Server) -> None:
    require("buildah", "runc")
    buildah = ContainersTool("buildah")
    ref = f"{registry.host}/{IMAGE}"
    try:
        timed(
            "buildah from",
            lambda: buildah("from", "--quiet", "--name", "hello", "--tls-verify=false", ref),
        )
        out = timed(
            "buildah run",
            lambda: buildah("run", "--runtime", "runc", "--network", "none", "hello", "hello"),
        )
        assert out.strip() == GREETING
    finally:
        buildah.close()


def test_containerd_pull_and_run(registry: Server, containerd: Containerd, multi: bool) -> None:
    ref = f"{registry.host}/{IMAGE}:latest"
    timed("ctr pull", lambda: containerd("image", "pull", "--plain-http", ref))
    container = "hello-" + registry.host.rsplit(":", 1)[1]
    out = timed("ctr run", lambda: containerd.run_container(ref, container, "hello"))
    assert out.strip() == GREETING
    images = containerd("image", "ls")
    assert ref in images and (OCI_INDEX if multi else OCI_MANIFEST) in images
    containerd("image", "rm", ref)


def amd64_manifest_digest(index: dict[str, Any]) -> str:
    (entry,) = [m for m in index["manifests"] if m["platform"]["architecture"] == "amd64"]
    return entry["digest"]


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()


def test_oras_downloads_every_blob(registry: Server, tmp_path: Path, multi: bool) -> None:
    import oras.provider

    # oras retries every failed request for minutes; a failure must show at once.
    registry_client = oras.provider.Registry(insecure=True)
    registry_client.do_request = oras.provider.Registry.do_request.__wrapped__.__get__(
        registry_client
    )

    def pull() -> int:
        ref = f"{registry.host}/{IMAGE}:latest"
        manifest = registry_client.get_manifest(ref)
        assert (manifest["mediaType"] == OCI_INDEX) == multi
        if multi:
            ref = f"{registry.host}/{IMAGE}@{amd64_manifest_digest(manifest)}"
            manifest = registry_client.get_manifest(ref)
        assert manifest["mediaType"] == OCI_MANIFEST
        # Not pull(): it would unpack gzip layers instead of saving them.
        for descriptor in [manifest["config"], *manifest["layers"]]:
            path = registry_client.download_blob(
                ref, descriptor["digest"], str(tmp_path / descriptor["digest"])
            )
            assert sha256_file(path) == descriptor["digest"]
            assert os.path.getsize(path) == descriptor["size"]
        return len(manifest["layers"])

    assert timed("oras download_blob", pull) > 1
    assert registry_client.get_tags(f"{registry.host}/{IMAGE}") == ["latest"]


def test_python_dxf_pulls_every_blob(registry: Server, multi: bool) -> None:
    import dxf

    client = dxf.DXF(registry.host, IMAGE, insecure=True, timeout=60)

    def pull() -> int:
        body, response = client.get_manifest_and_response("latest")
        manifest = json.loads(body)
        assert response.headers["Content-Type"] == manifest["mediaType"]
        assert (manifest["mediaType"] == OCI_INDEX) == multi
        if multi:
            manifest = json.loads(
                client.get_manifest_and_response(amd64_manifest_digest(manifest))[0]
            )
        size = 0
        for digest in [manifest["config"]["digest"], *(x["digest"] for x in manifest["layers"])]:
            chunks = cast(Iterable[bytes], client.pull_blob(digest))  # verifies the digest
            size += sum(len(chunk) for chunk in chunks)
        return size

    assert timed("python-dxf pull", pull) > 1_000_000
    digest, _ = client.head_manifest_and_response("latest")
    assert digest and digest.startswith("sha256:")
    assert client.list_aliases() == ["latest"]
    assert client.list_aliases(batch_size=1) == ["latest"]


def docker_manifest_inspect(registry: Server, home: Path, *flags: str) -> Any:
    if not os.access(DOCKER_CLI, os.X_OK):
        pytest.fail(f"missing {DOCKER_CLI} (Debian's docker.io): run scripts/bootstrap --test")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "DOCKER_CONFIG": str(home / ".docker")}
    argv = [DOCKER_CLI, "manifest", "inspect", "--insecure", *flags, f"{registry.host}/{IMAGE}"]
    return json.loads(run(argv, env=env).stdout)


def test_docker_cli_manifest_inspect(registry: Server, multi: bool, tmp_path: Path) -> None:
    """Docker 20.10 names the OCI index but not the OCI manifest: it gets Docker's dialect."""
    manifest = timed("docker manifest inspect", lambda: docker_manifest_inspect(registry, tmp_path))
    if not multi:
        assert manifest["mediaType"] == DOCKER_MANIFEST
        assert manifest["config"]["mediaType"] == DOCKER_CONFIG
        return
    assert manifest["mediaType"] == DOCKER_LIST
    entries = manifest["manifests"]
    assert [m["mediaType"] for m in entries] == [DOCKER_MANIFEST, DOCKER_MANIFEST]
    assert [m["platform"]["architecture"] for m in entries] == ["amd64", "arm64"]
    # --verbose fetches every entry of the list, so each must be one it reads.
    verbose = docker_manifest_inspect(registry, tmp_path, "--verbose")
    assert [v["SchemaV2Manifest"]["mediaType"] for v in verbose] == [DOCKER_MANIFEST] * 2
    assert [v["Descriptor"]["digest"] for v in verbose] == [m["digest"] for m in entries]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=accept_headers())
def test_any_accept_header_gets_a_type_it_named(
    registry: Server, multi: bool, header: tuple[list[str], set[str]]
) -> None:
    """Whatever the Accept lines, the served document and a list's entries are types named."""
    lines, named = header
    path = f"/v2/{IMAGE}/manifests/latest"
    reply = call(registry.host, "GET", path, [("Accept", line) for line in lines])
    assert reply.status == 200, reply.body
    served = reply.require_header("Content-Type")
    assert served in served_types(named)
    assert reply.json()["mediaType"] == served
    if served in (OCI_INDEX, DOCKER_LIST):
        assert multi
        for entry in reply.json()["manifests"]:
            assert entry["mediaType"] in named
            got = call(registry.host, "GET", f"/v2/{IMAGE}/manifests/{entry['digest']}")
            assert got.require_header("Content-Type") == entry["mediaType"]
