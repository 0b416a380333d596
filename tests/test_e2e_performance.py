"""Packing, zstd layers, the build queue and blob serving, against real Nix,
the real server and real clients. Nothing here asserts on time; the
benchmarks in `benchmarks/` measure speed."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from nixery.assembly.manifest import negotiate
from nixery.images.model import BuildSettings
from nixery.images.service import ImageService
from nixery.packages.nix import Nix
from nixery.packages.sources import SourceConfig, Sources
from nixery.storage import FilesystemStorage
from tests.clients import TIMEOUT, skopeo_copy
from tests.conftest import FIXTURE_PKGS, Server, StartServer, require
from tests.gated import GatedPackage, make_gated_package
from tests.http import Reply, call

pytestmark = pytest.mark.e2e

OCI = "application/vnd.oci.image.manifest.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@pytest.fixture
def gates() -> Iterator[Callable[..., list[GatedPackage]]]:
    """Makes packages whose builds wait until the test opens their gates; a
    fresh nonce gives new store paths, so every test run really builds them."""
    made: list[GatedPackage] = []

    def make(*names: str) -> list[GatedPackage]:
        packages = [make_gated_package(name) for name in names]
        made.extend(packages)
        return packages

    yield make
    for package in made:
        package.remove()


def overlays(*packages: GatedPackage) -> list[str]:
    return [arg for package in packages for arg in ("--overlay", str(package.overlay))]


def builds_of(server: Server, image: str) -> int:
    started = re.findall(r": build started image=(\S+) ", server.log_text())
    assert started or "build started" not in server.log_text(), "the log format changed"
    return started.count(image)


def wait_for_log(server: Server, pattern: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, server.log_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not logged:\n{server.log_text()}")
        time.sleep(0.05)


def wait_for(condition: Callable[[], bool], server: Server, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.05)


def get_manifest(server: Server, name: str, accept: str = OCI) -> Reply:
    return call(server.host, "GET", f"/v2/{name}/manifests/latest", {"Accept": accept})


def pull(server: Server, name: str) -> str:
    """A pull at the protocol level: manifest, config and layers, each checked
    against its digest. Returns the manifest digest."""
    reply = get_manifest(server, name)
    assert reply.status == 200, reply.body
    manifest = reply.json()
    for desc in [manifest["config"], *manifest["layers"]]:
        blob = call(server.host, "GET", f"/v2/{name}/blobs/{desc['digest']}")
        assert blob.status == 200
        assert "sha256:" + hashlib.sha256(blob.body).hexdigest() == desc["digest"]
    return str(reply.header("Docker-Content-Digest"))


def test_parallel_packing_gives_the_same_bytes_as_sequential(tmp_path: Path) -> None:
    request = "shell/curl/git/python3/jq"
    blobs = []
    for workers in (1, 4):
        storage = FilesystemStorage(tmp_path / f"workers-{workers}")
        service = ImageService(
            storage,
            Nix(timeout=120),
            Sources(SourceConfig("path", str(FIXTURE_PKGS))),
            BuildSettings(pack_workers=workers, max_builds=1),
        )
        service.manifest(request, "latest", negotiate([OCI]))
        assert service.layers_packed > 5
        blob_dir = storage.blob_dir
        blobs.append({p.name: p.read_bytes() for p in blob_dir.iterdir()})
    assert blobs[0] == blobs[1]


def test_zstd_layers_for_oci_and_gzip_for_docker(start_server: StartServer, tmp_path: Path) -> None:
    require("skopeo", "podman")
    server = start_server("--compression", "zstd")
    oci = get_manifest(server, "shell/hello").json()
    docker = get_manifest(server, "shell/hello", DOCKER).json()
    assert {layer["mediaType"] for layer in oci["layers"]} == {ZSTD_LAYER}
    assert {layer["mediaType"] for layer in docker["layers"]} == {DOCKER_LAYER}
    # The same tars: both configs list the same diff_ids.
    configs = [
        call(server.host, "GET", f"/v2/shell/hello/blobs/{m['config']['digest']}").json()
        for m in (oci, docker)
    ]
    diff_ids = configs[0]["rootfs"]["diff_ids"]
    assert configs[1]["rootfs"]["diff_ids"] == diff_ids

    # skopeo verifies every blob's digest while copying.
    skopeo_copy(server.host, "shell/hello", tmp_path / "oci")
    layout = tmp_path / "oci" / "blobs" / "sha256"
    for layer, diff_id in zip(oci["layers"], diff_ids, strict=True):
        data = (layout / layer["digest"].split(":")[1]).read_bytes()
        tar = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
    for layer, diff_id in zip(docker["layers"], diff_ids, strict=True):
        data = call(server.host, "GET", f"/v2/shell/hello/blobs/{layer['digest']}").body
        assert "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest() == diff_id

    # podman reads zstd layers: pull and run.
    assert podman_run(server, "shell/hello", "hello") == "Hello, world!\n"


def podman_run(server: Server, image: str, *command: str) -> str:
    # podman refuses a runroot path longer than 50 characters.
    with tempfile.TemporaryDirectory(prefix="nixery-podman-", dir="/tmp") as tmp:
        return podman_run_in(Path(tmp), server, image, *command)


def podman_run_in(state: Path, server: Server, image: str, *command: str) -> str:
    registries = state / "registries.conf"
    registries.write_text(f'[[registry]]\nlocation = "{server.host}"\ninsecure = true\n')
    base = ["podman", "--root", str(state / "root"), "--runroot", str(state / "run"),
            "--tmpdir", str(state / "tmp"), "--cgroup-manager", "cgroupfs",
            "--events-backend", "file"]  # fmt: skip
    # This machine: runc (crun fails on hybrid cgroups), no network setup, and
    # ulimits below the hard limit (no CAP_SYS_RESOURCE).
    argv = [*base, "run", "--rm", "--tls-verify=false", "--runtime", "runc", "--network", "none",
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
            f"{server.host}/{image}", *command]  # fmt: skip
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(registries)}
    try:
        return run_env(argv, env)
    finally:
        run_env([*base, "rmi", "-af"], env, check=False)


def run_env(argv: list[str], env: dict[str, str], check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def test_32_concurrent_pulls_of_one_image_build_it_once(
    start_server: StartServer, gates: Callable[..., list[GatedPackage]]
) -> None:
    (slowone,) = gates("slowone")
    # All 32 come from one address: let each have a worker, since this is
    # about one build per image, not about each address's share of workers.
    server = start_server(*overlays(slowone), "--max-active-per-address", "32")
    with ThreadPoolExecutor(32) as pool:
        pulls = [pool.submit(pull, server, "slowone") for _ in range(32)]
        # All 32 wait for the one build before it may finish.
        wait_for(lambda: builds_queued(server) == 31, server)
        slowone.open()
        digests = [p.result() for p in pulls]
    assert len(set(digests)) == 1
    assert builds_of(server, "slowone") == 1


def test_beyond_the_queue_clients_get_429_with_retry_after(
    start_server: StartServer, gates: Callable[..., list[GatedPackage]]
) -> None:
    packages = gates("slowa", "slowb", "slowc")
    server = start_server(*overlays(*packages), "--max-builds", "1", "--max-queue", "1")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(get_manifest, server, "slowa")
        wait_for_log(server, "build started image=slowa ")
        second = pool.submit(get_manifest, server, "slowb")
        wait_for_log(server, "build queue: 1 building, 1 waiting")
        refused = get_manifest(server, "slowc")
        assert refused.status == 429
        assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert int(refused.header("Retry-After") or "0") >= 1
        for package in packages:
            package.open()
        assert first.result().status == 200
        assert second.result().status == 200
    assert builds_of(server, "slowc") == 0
    # Once there is room again, the retry is built.
    assert get_manifest(server, "slowc").status == 200


def builds_queued(server: Server) -> float:
    metrics = call(server.host, "GET", "/metrics").body.decode()
    found = re.search(r"^nixery_builds_queued (\S+)$", metrics, re.MULTILINE)
    assert found, metrics
    return float(found.group(1))


def test_past_max_waiting_requests_get_429_and_the_build_goes_on(
    start_server: StartServer, gates: Callable[..., list[GatedPackage]]
) -> None:
    (slowwait,) = gates("slowwait")
    server = start_server(*overlays(slowwait), "--max-waiting", "2")
    assert get_manifest(server, "hello").status == 200
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(get_manifest, server, "slowwait") for _ in range(2)]
        wait_for(lambda: builds_queued(server) >= 1, server)  # the second request is inside too
        for name in ("slowwait", "slowwait/hello"):
            refused = get_manifest(server, name)
            assert refused.status == 429, refused.body
            assert refused.error_codes() == ["TOOMANYREQUESTS"]
            assert int(refused.require_header("Retry-After")) >= 1
        # Whatever does not wait for a build is still answered.
        assert get_manifest(server, "hello").status == 200
        assert call(server.host, "GET", "/v2/").status == 200
        slowwait.open()
        assert [f.result().status for f in waiting] == [200, 200]
    # The refused new image was started before its request was turned away:
    # its build went on, so the retry finds it stored.
    wait_for_log(server, r"built slowwait/hello for ")
    assert get_manifest(server, "slowwait/hello").status == 200
    assert builds_of(server, "slowwait") == 1
    assert builds_of(server, "slowwait/hello") == 1


def test_a_build_finishes_and_is_cached_after_its_client_left(
    start_server: StartServer, gates: Callable[..., list[GatedPackage]]
) -> None:
    (slowleft,) = gates("slowleft")
    server = start_server(*overlays(slowleft))
    host, port = server.host.split(":")
    with socket.create_connection((host, int(port))) as sock:
        request = f"GET /v2/slowleft/manifests/latest HTTP/1.1\r\nHost: {server.host}\r\n"
        sock.sendall(f"{request}Accept: {OCI}\r\n\r\n".encode())
        wait_for_log(server, "build started image=slowleft ")
    # The client is gone before the build may finish; it goes on and stores everything.
    slowleft.open()
    wait_for_log(server, r"built slowleft for .*packed \d+ layers")
    images = list((server.storage / "documents" / "images").iterdir())
    assert len(images) == 1
    built = json.loads(images[0].read_text())
    assert any("slowleft" in path for layer in built["layers"] for path in layer["paths"])
    # The retry is served from storage: no second build.
    assert pull(server, "slowleft")
    assert builds_of(server, "slowleft") == 1


def test_large_blobs_whole_in_ranges_and_head(server: Server) -> None:
    manifest = get_manifest(server, "bigdata").json()
    layer = max(manifest["layers"], key=lambda d: d["size"])
    assert layer["size"] > 64 << 20
    path = f"/v2/bigdata/blobs/{layer['digest']}"
    whole = call(server.host, "GET", path)
    assert whole.status == 200
    assert whole.header("Content-Length") == str(layer["size"])
    assert "sha256:" + hashlib.sha256(whole.body).hexdigest() == layer["digest"]
    size = layer["size"]
    for spec, start, end in [
        ("bytes=0-0", 0, 1),
        (f"bytes={size - 1000}-", size - 1000, size),
        ("bytes=-4096", size - 4096, size),
        (f"bytes=1048570-{3 << 20}", 1048570, (3 << 20) + 1),
    ]:
        part = call(server.host, "GET", path, {"Range": spec})
        assert part.status == 206, spec
        assert part.body == whole.body[start:end], spec
        assert part.header("Content-Range") == f"bytes {start}-{end - 1}/{size}"
    head = call(server.host, "HEAD", path)
    assert head.status == 200 and head.body == b""
    assert head.header("Content-Length") == str(size)
    refused = call(server.host, "GET", path, {"Range": f"bytes={size}-"})
    assert refused.status == 416
    assert refused.header("Content-Range") == f"bytes */{size}"
    # A keep-alive connection still works after a sendfile response.
    host, port = server.host.split(":")
    with socket.create_connection((host, int(port))) as sock:
        for _ in range(2):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n".encode())
            response = read_response(sock)
            assert response.startswith(b"HTTP/1.1 206") and response.endswith(whole.body[:10])


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body
