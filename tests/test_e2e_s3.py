"""End to end through the S3 backend: real Nix, a real S3 server (Ceph RGW),
real clients, and several replicas sharing one bucket."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.clients import bwrap_run, run, skopeo_copy, umoci_unpack
from tests.conftest import Server, StartServer, require
from tests.http import call
from tests.s3server import S3Server

pytestmark = pytest.mark.e2e

OCI = "application/vnd.oci.image.manifest.v1+json"
StartReplica = Callable[..., Server]


@pytest.fixture
def start_replica(start_server: StartServer, s3_server: S3Server) -> StartReplica:
    """A Nixery server on the S3 backend; the AWS credentials reach it only via
    the environment, as in a real deployment."""

    def start(bucket: str, *args: str) -> Server:
        return start_server(
            "--storage-backend", "s3", "--s3-bucket", bucket, "--s3-endpoint", s3_server.endpoint,
            "--s3-path-style", *args, env=s3_server.env,
        )  # fmt: skip

    return start


def manifest(server: Server, image: str) -> tuple[str, dict]:
    reply = call(server.host, "GET", f"/v2/{image}/manifests/latest", {"Accept": OCI})
    assert reply.status == 200, reply.body[:500]
    return reply.header("Docker-Content-Digest") or "", json.loads(reply.body)


def layout_manifest_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return index["manifests"][0]["digest"]


@pytest.fixture
def podman_dir() -> Iterator[Path]:
    # podman refuses a run root path longer than 50 characters.
    path = Path(tempfile.mkdtemp(prefix="nixery-pm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def podman(tmp: Path, *args: str) -> str:
    argv = ["podman", "--root", str(tmp / "root"), "--runroot", str(tmp / "run"),
            "--tmpdir", str(tmp / "tmp"), "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file", *args]  # fmt: skip
    return run(argv).stdout


def test_skopeo_and_podman_pull_blobs_from_presigned_urls(
    start_replica: StartReplica, s3_server: S3Server, tmp_path: Path, podman_dir: Path
) -> None:
    require("skopeo", "umoci", "bwrap", "podman", "runc")
    bucket = s3_server.new_bucket()
    server = start_replica(bucket)
    digest, body = manifest(server, "shell/hello")

    # Blobs are never served by Nixery: 307 to a presigned URL on the store,
    # which carries nothing of the client's own credentials.
    layer = body["layers"][0]["digest"]
    token = "Bearer client-secret-token"
    reply = call(server.host, "GET", f"/v2/shell/hello/blobs/{layer}", {"Authorization": token})
    assert reply.status == 307
    location = reply.header("Location") or ""
    assert location.startswith(f"{s3_server.endpoint}/{bucket}/blobs/sha256/{layer[7:]}?")
    assert "X-Amz-Signature=" in location and "client-secret-token" not in location

    skopeo_copy(server.host, "shell/hello", tmp_path / "oci")
    assert layout_manifest_digest(tmp_path / "oci") == digest
    rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
    assert bwrap_run(rootfs, "hello").strip() == "Hello, world!"

    ref = f"{server.host}/shell/hello"
    podman(podman_dir, "pull", "-q", "--tls-verify=false", ref)
    out = podman(podman_dir, "--runtime", "runc", "run", "--rm", "--pull=never",
                 "--network", "none", "--ulimit", "nofile=1024:1024",
                 "--ulimit", "nproc=1024:1024", ref, "hello")  # fmt: skip
    assert out.strip() == "Hello, world!"
    inspected = podman(podman_dir, "image", "inspect", "--format", "{{.Digest}}", ref)
    assert inspected.strip() == digest


def test_proxy_mode_streams_blobs_with_its_own_credentials(
    start_replica: StartReplica, s3_server: S3Server, tmp_path: Path
) -> None:
    require("skopeo")
    server = start_replica(s3_server.new_bucket(), "--s3-redirect", "off")
    _, body = manifest(server, "hello")
    for layer in body["layers"]:
        path = f"/v2/hello/blobs/{layer['digest']}"
        # Forwarding this header would make the store refuse the request.
        reply = call(server.host, "GET", path, {"Authorization": "Bearer client-secret-token"})
        assert reply.status == 200
        assert "sha256:" + hashlib.sha256(reply.body).hexdigest() == layer["digest"]
        assert reply.header("Docker-Content-Digest") == layer["digest"]
        head = call(server.host, "HEAD", path)
        assert head.status == 200 and head.body == b""
        assert head.header("Content-Length") == str(layer["size"])
    # Ranges are fetched from the store as ranges.
    layer = body["layers"][0]
    whole = call(server.host, "GET", f"/v2/hello/blobs/{layer['digest']}").body
    part = call(server.host, "GET", f"/v2/hello/blobs/{layer['digest']}", {"Range": "bytes=10-99"})
    assert part.status == 206 and part.body == whole[10:100]
    assert part.header("Content-Range") == f"bytes 10-99/{layer['size']}"
    missing = call(server.host, "GET", "/v2/hello/blobs/sha256:" + "0" * 64)
    assert missing.status == 404 and missing.error_codes() == ["BLOB_UNKNOWN"]
    skopeo_copy(server.host, "hello", tmp_path / "oci")


def test_a_replica_serves_what_another_built(
    start_replica: StartReplica, s3_server: S3Server, tmp_path: Path
) -> None:
    require("skopeo")
    bucket = s3_server.new_bucket()
    first, second = start_replica(bucket), start_replica(bucket)
    skopeo_copy(first.host, "shell/curl", tmp_path / "a")
    assert "packed 0 layers" not in first.log_text()

    skopeo_copy(second.host, "shell/curl", tmp_path / "b")
    assert layout_manifest_digest(tmp_path / "a") == layout_manifest_digest(tmp_path / "b")
    # The image document from the first replica: no Nix build, nothing packed.
    assert "built " not in second.log_text()
    assert "packed" not in second.log_text()
    # Nothing went to the replicas' local storage.
    for server in (first, second):
        assert not list((server.storage / "blobs" / "sha256").glob("*"))


def test_concurrent_cold_pulls_on_two_replicas_agree(
    start_replica: StartReplica, s3_server: S3Server, tmp_path: Path
) -> None:
    require("skopeo")
    bucket = s3_server.new_bucket()
    replicas = [start_replica(bucket), start_replica(bucket)]
    image = "shell/curl/git/python3"
    errors: list[BaseException] = []

    def pull(i: int) -> None:
        try:
            skopeo_copy(replicas[i].host, image, tmp_path / f"oci{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    assert layout_manifest_digest(tmp_path / "oci0") == layout_manifest_digest(tmp_path / "oci1")
    assert [manifest(r, image)[0] for r in replicas] == [
        layout_manifest_digest(tmp_path / "oci0")
    ] * 2
    assert s3_server.broken_blobs(bucket) == []
    assert s3_server.keys(bucket, "uploads/") == {}
    assert s3_server.uploads_in_progress(bucket) == []


def test_a_replica_killed_mid_upload_leaves_no_partial_blob(
    start_replica: StartReplica, s3_server: S3Server, tmp_path: Path
) -> None:
    require("skopeo")
    bucket = s3_server.new_bucket()
    victim = start_replica(bucket)

    def build() -> None:
        # bigdata holds 64 MiB of incompressible bytes: a layer of several parts.
        with contextlib.suppress(ConnectionError):
            call(victim.host, "GET", "/v2/bigdata/manifests/latest", timeout=300)

    request = threading.Thread(target=build, daemon=True)
    request.start()
    deadline = time.monotonic() + 240
    while not s3_server.uploads_in_progress(bucket):
        assert time.monotonic() < deadline, "no upload started:\n" + victim.log_text()
        assert victim.process.poll() is None
        time.sleep(0.02)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    request.join(30)

    # Killed mid-upload: the upload is left unfinished, no blob key is partial.
    assert s3_server.uploads_in_progress(bucket) != []
    assert s3_server.broken_blobs(bucket) == []
    assert all(size < 64 << 20 for size in s3_server.keys(bucket, "blobs/").values())

    survivor = start_replica(bucket)
    skopeo_copy(survivor.host, "bigdata", tmp_path / "oci")
    assert s3_server.broken_blobs(bucket) == []
    assert max(s3_server.keys(bucket, "blobs/").values()) > 64 << 20


def test_blob_base_url_sends_clients_to_a_public_front(
    start_replica: StartReplica, s3_server: S3Server, tmp_path: Path
) -> None:
    require("skopeo")
    bucket = s3_server.new_bucket()
    # Stands in for a CDN: anonymous reads of blobs only, straight from the store.
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                       "Resource": f"arn:aws:s3:::{bucket}/cdn/blobs/*"}],
    }  # fmt: skip
    s3_server.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    base = f"{s3_server.endpoint}/{bucket}"
    server = start_replica(bucket, "--s3-prefix", "cdn", "--blob-base-url", base)
    _, body = manifest(server, "hello")
    layer = body["layers"][0]["digest"]
    reply = call(server.host, "GET", f"/v2/hello/blobs/{layer}")
    assert reply.status == 307
    assert reply.header("Location") == f"{base}/cdn/blobs/sha256/{layer[7:]}"
    skopeo_copy(server.host, "hello", tmp_path / "oci")
    # ...and documents stay private.
    doc = next(iter(s3_server.keys(bucket, "cdn/documents/")))
    assert call(f"127.0.0.1:{s3_server.port}", "GET", f"/{bucket}/{doc}").status == 403


def test_an_unreachable_bucket_fails_at_start(s3_server: S3Server, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "nixery", "serve", "--storage-path", str(tmp_path),
            "--storage-backend", "s3", "--s3-bucket", "no-such-bucket",
            "--s3-endpoint", s3_server.endpoint]  # fmt: skip
    env = {**os.environ, **s3_server.env}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 1
    assert "checking bucket no-such-bucket" in proc.stderr and "404" in proc.stderr
