"""Crashes, full disks, corrupt entries and build timeouts, with the real storage and server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixery.storage import FilesystemStorage, StorageError
from tests.attack import processes_mentioning
from tests.clients import skopeo_copy
from tests.conftest import Server, StartServer, require
from tests.gated import WAITING, GatedPackage
from tests.http import call

OVERLAY = Path(__file__).parent / "fixtures" / "robustness" / "overlay.nix"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def digests_in(document: object) -> set[str]:
    """Every `digest` value anywhere in a JSON document."""
    if isinstance(document, dict):
        found = {document["digest"]} if isinstance(document.get("digest"), str) else set()
        return found.union(*(digests_in(value) for value in document.values()))
    if isinstance(document, list):
        return set().union(*(digests_in(value) for value in document))
    return set()


def blobs_needed_by(blobs: Path, image: object) -> set[str]:
    """What an image document points at, read from the files themselves: the
    digests it names, and those named by each manifest (and list) it names."""
    needed = digests_in(image)
    pending = [d["digest"] for d in image["manifests"].values()]  # type: ignore[index]
    while pending:
        digest = pending.pop()
        blob = blobs / digest.split(":")[1]
        assert blob.exists(), f"manifest {digest} is missing"
        manifest = json.loads(blob.read_bytes())
        listed = digests_in(manifest) - needed
        needed |= listed
        pending += [d["digest"] for d in manifest.get("manifests", [])]
    return needed


def assert_consistent(root: Path) -> int:
    """Only complete, matching blobs; documents point only at present blobs.

    Returns the number of blobs checked.
    """
    blobs = root / "blobs" / "sha256"
    for blob in blobs.iterdir():
        assert sha256_file(blob) == "sha256:" + blob.name, f"corrupt blob {blob.name}"
    for document in (root / "documents" / "images").rglob("*.json"):
        for digest in blobs_needed_by(blobs, json.loads(document.read_bytes())):
            assert (blobs / digest.split(":")[1]).exists(), (document.name, digest)
    for document in (root / "documents" / "layers").rglob("*.json"):
        for digest in digests_in(json.loads(document.read_bytes())):
            assert (blobs / digest.split(":")[1]).exists(), (document.name, digest)
    return len(list(blobs.iterdir()))


def tmp_files(root: Path) -> list[Path]:
    return [p for p in (root / "tmp").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


# -- storage on its own ----------------------------------------------------------------

WRITER = """
import os, sys, time
from nixery.storage import FilesystemStorage
storage = FilesystemStorage(sys.argv[1])
writer = storage.blob_writer()
writer.write(b"x" * 100_000)
writer._fh.flush()
print("writing", flush=True)
time.sleep(600)
"""


def start_writer(root: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    return proc


def test_temp_files_of_dead_writers_are_removed_at_start(tmp_path: Path) -> None:
    dead, alive = start_writer(tmp_path), start_writer(tmp_path)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    try:
        (tmp_path / "tmp" / "blob-from-an-old-layout").write_bytes(b"x")
        assert len(tmp_files(tmp_path)) == 3
        storage = FilesystemStorage(tmp_path)
        assert storage.cleaned.wait(60)
        # Only the live writer's half-written blob is left.
        left = tmp_files(tmp_path)
        assert len(left) == 1 and str(alive.pid) in left[0].parent.name
        assert storage.removed_tmp == 2
        storage.close()
    finally:
        alive.kill()
        alive.wait()


def test_corrupt_blobs_are_never_served_after_a_restart(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path)
    digest = storage.put_blob(b"hello world" * 1000)
    path = storage.blob_path(digest)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    storage.close()

    restarted = FilesystemStorage(tmp_path)
    assert restarted.locate_blob(digest) is None
    assert restarted.read_blob(digest) is None
    assert not path.exists()  # deleted, so the next build writes it again
    assert restarted.put_blob(b"hello world" * 1000) == digest
    assert restarted.read_blob(digest) == b"hello world" * 1000
    restarted.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (tests run as root): {result.stderr.decode()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.e2e  # mounts a file system: needs root on the real machine
def test_full_disk_is_a_clear_error_and_leaves_nothing(small_disk: Path) -> None:
    storage = FilesystemStorage(small_disk)
    small = storage.put_blob(b"fits")
    with pytest.raises(StorageError, match="storage is full"):
        with storage.blob_writer() as writer:
            for _ in range(8):
                writer.write(os.urandom(1 << 20))
            writer.commit()
    with pytest.raises(StorageError, match="storage is full"):
        storage.put_document("images/x.json", os.urandom(8 << 20))
    assert tmp_files(small_disk) == []
    assert [p.name for p in storage.blob_dir.iterdir()] == [small.split(":")[1]]
    assert storage.get_document("images/x.json") is None
    assert storage.read_blob(small) == b"fits"
    storage.close()


# -- the real server ------------------------------------------------------------------------


def serve(start_server: StartServer, storage: Path, *args: str) -> Server:
    return start_server("--overlay", str(OVERLAY), *args, storage=storage)


def request_in_background(server: Server, name: str) -> threading.Thread:
    def get() -> None:
        try:
            call(server.host, "GET", f"/v2/{name}/manifests/latest", timeout=300)
        except OSError:
            pass  # the server was killed

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    return thread


def wait_for_blob_write(storage: Path, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.startswith("blob-") and size(p) > 0 for p in tmp_files(storage)):
            return True
        time.sleep(0.005)
    return False


def size(path: Path) -> int:
    """The file's size; 0 once it has been renamed into place (or removed)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def wait_at_the_gate(server: Server, image: str, timeout: float = 120) -> bool:
    """Until the build of `image` says (in its log on /builds.json) that Nix waits at the gate."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = call(server.host, "GET", "/builds.json").json()["running"]
        if any(b["image"] == image and WAITING in b["log"] for b in running):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.e2e
def test_sigkill_during_builds_leaves_only_complete_entries(
    start_server: StartServer, tmp_path: Path, gated: GatedPackage
) -> None:
    require("skopeo")
    storage = tmp_path / "storage"
    overlay = ("--overlay", str(gated.overlay))
    images = ["big20", f"big24/{gated.name}", "big28"]
    for number, image in enumerate(images):
        server = serve(start_server, storage, *overlay)
        request_in_background(server, image)
        if number % 2 == 0:
            # In the middle of writing a layer to storage.
            assert wait_for_blob_write(storage), server.log_text()
        else:
            # While Nix builds: the gated package waits until the test opens its gate.
            assert wait_at_the_gate(server, image), server.log_text()
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        assert_consistent(storage)
    gated.open()  # the orphaned build may finish; nothing waits for it

    # Restart: stale temp files go, everything is rebuilt as needed and pulls.
    server = serve(start_server, storage, *overlay)
    deadline = time.monotonic() + 60
    while tmp_files(storage) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tmp_files(storage) == []
    for number, image in enumerate(images):
        skopeo_copy(server.host, image, tmp_path / f"oci-{number}")  # skopeo checks digests
    assert assert_consistent(storage) > 0
    assert len(list((storage / "documents" / "images").glob("*.json"))) >= len(images)


@pytest.mark.e2e
def test_sigkill_during_a_download_and_corruption_found_after_restart(
    start_server: StartServer, tmp_path: Path
) -> None:
    require("skopeo")
    storage = tmp_path / "storage"
    server = serve(start_server, storage)
    manifest = call(server.host, "GET", "/v2/big20/manifests/latest").json()
    layer = max(manifest["layers"], key=lambda entry: entry["size"])
    port = int(server.host.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET /v2/big20/blobs/{layer['digest']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(65536)
        server.process.send_signal(signal.SIGKILL)  # mid-download
        server.process.wait()
    assert_consistent(storage)

    # Bit rot while the server was down: the damaged layer is found and rebuilt.
    small = min(manifest["layers"], key=lambda entry: entry["size"])
    damaged = storage / "blobs" / "sha256" / small["digest"].split(":")[1]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))

    server = serve(start_server, storage)
    skopeo_copy(server.host, "big20", tmp_path / "oci")
    assert "does not match its digest" in server.log_text()
    assert_consistent(storage)


@pytest.mark.e2e
def test_full_disk_during_a_build(start_server: StartServer, small_disk: Path) -> None:
    server = serve(start_server, small_disk)
    reply = call(server.host, "GET", "/v2/big20/manifests/latest")
    assert reply.status == 500
    assert "storage is full" in reply.json()["errors"][0]["message"]
    assert tmp_files(small_disk) == []
    assert_consistent(small_disk)
    assert call(server.host, "GET", "/v2/").status == 200


@pytest.mark.e2e
def test_build_timeout_is_a_clear_error_and_leaves_no_process(start_server: StartServer) -> None:
    nonce = uuid.uuid4().hex
    server = start_server(
        "--overlay", str(OVERLAY), "--nix-timeout", "3", env={"NIXERY_TEST_NONCE": nonce}
    )
    reply = call(server.host, "GET", "/v2/sleepy/manifests/latest")
    assert reply.status == 500
    error = reply.json()["errors"][0]
    assert "timed out" in error["message"] + error.get("detail", {}).get("log", ""), error

    # Nothing of the build is left: not nix-store, not its builder (another session).
    def left() -> list[tuple[int, str]]:
        return [p for p in processes_mentioning(nonce) if p[0] != server.process.pid]

    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left() == []
    assert call(server.host, "GET", "/v2/").status == 200


def test_a_timeout_terminates_the_group_before_killing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands get SIGTERM first, so Nix can stop builders in their own sessions."""
    from nixery.errors import CommandTimeout
    from nixery.packages import process

    monkeypatch.setattr(process, "TERM_GRACE", 1.0)

    script = "trap 'echo terminated >&2; exit 3' TERM; sleep 30 & wait"
    with pytest.raises(CommandTimeout) as err:
        process.run(["sh", "-c", script], timeout=1)
    assert "terminated" in err.value.stderr
    stubborn = "trap '' TERM; sleep 31 & wait"
    with pytest.raises(CommandTimeout):
        process.run(["sh", "-c", stubborn], timeout=1)
    assert not processes_mentioning("sleep 31")  # SIGKILL after the grace period
