"""`nixery gc` and Nix GC roots, with the real storage, server and Nix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nixery.gc import collect
from nixery.images import BuiltImage, Layer
from nixery.manifest import Descriptor, Format, config_document, manifest_document
from nixery.nix import Nix, temporary_roots
from nixery.sources import NixSource
from nixery.storage import FilesystemStorage
from tests.conftest import FIXTURE_PKGS, StartServer
from tests.http import call

HOUR = 3600.0
DAY = 86400.0


def store_image(storage: FilesystemStorage, key: str, layers: list[bytes]) -> BuiltImage:
    """An image document as the builder writes it: blobs first, the document last."""
    stored = []
    for data in layers:
        digest = storage.put_blob(data)
        stored.append(Layer(digest, len(data), digest, ()))
        storage.put_document(
            f"layers/{digest[7:19]}.json", json.dumps(stored[-1].to_json()).encode()
        )
    config = config_document({"key": key}, Format.OCI)
    storage.put_blob(config.data)
    manifest = manifest_document(
        Format.OCI,
        config.descriptor(),
        [Descriptor(Format.OCI.layer_type, layer.digest, layer.size) for layer in stored],
    )
    storage.put_blob(manifest.data)
    image = BuiltImage({"OCI": manifest.descriptor()}, tuple(stored), ("p",))
    storage.put_document(f"images/{key}.json", json.dumps(image.to_json()).encode())
    return image


def age(storage: FilesystemStorage, seconds: float) -> None:
    """Make every entry look `seconds` older."""
    for path in [*storage.blob_dir.iterdir(), *storage.doc_dir.rglob("*.json")]:
        st = path.stat()
        os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def blobs(storage: FilesystemStorage) -> set[str]:
    return {entry.name for entry in storage.list_blobs()}


def test_gc_expires_old_images_and_frees_their_blobs_after_the_grace(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path)
    old = store_image(storage, "old", [b"shared", b"only-old"])
    age(storage, 10 * DAY)
    new = store_image(storage, "new", [b"shared", b"only-new"])
    stray = storage.put_blob(b"written by a build in progress")
    abandoned = storage.put_blob(b"left by a failed build long ago")
    os.utime(storage.blob_path(abandoned), (0, time.time() - 2 * HOUR))
    before = blobs(storage)

    dry = collect(storage, keep=7 * DAY, grace=HOUR, dry_run=True)
    assert blobs(storage) == before
    assert dry.expired_images == ["images/old.json"] and dry.removed_blobs == [abandoned]

    first = collect(storage, keep=7 * DAY, grace=HOUR)
    assert first.expired_images == ["images/old.json"]
    assert storage.get_document("images/old.json") is None
    assert storage.get_document("expired/images/old.json") is not None
    # The tombstone still protects the expired image's blobs, and the grace
    # the blob of a build in progress.
    assert blobs(storage) == before - {abandoned} and stray in before

    later = time.time() + 2 * HOUR
    second = collect(storage, keep=7 * DAY, grace=HOUR, now=later)
    only_old = old.layers[1].digest
    assert second.dropped_tombstones == ["expired/images/old.json"]
    removed = set(second.removed_blobs)
    assert only_old in removed and old.manifests["OCI"].digest in removed
    # Kept: everything the new image needs, including the shared layer.
    assert {layer.digest for layer in new.layers} <= blobs(storage)
    assert new.manifests["OCI"].digest in blobs(storage)
    assert stray in removed  # two hours later, no build is still writing it
    assert f"layers/{only_old[7:19]}.json" in second.removed_layer_documents
    assert storage.get_document(f"layers/{new.layers[1].digest[7:19]}.json") is not None
    storage.close()


def test_marking_use_keeps_an_image_alive(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path)
    image = store_image(storage, "used", [b"layer"])
    age(storage, 10 * DAY)
    storage.mark_used("images/used.json", *[layer.digest for layer in image.layers])
    report = collect(storage, keep=7 * DAY, grace=HOUR)
    assert report.expired_images == [] and report.removed_blobs == []
    storage.close()


@pytest.mark.e2e
def test_gc_while_serving(start_server: StartServer, tmp_path: Path) -> None:
    """Pulls never fail while gc runs; an expired image's blobs go; it builds again."""
    server = start_server()
    for name in ("hello", "jq"):
        assert call(server.host, "GET", f"/v2/{name}/manifests/latest").status == 200
    storage = FilesystemStorage(server.storage)
    jq = {layer["digest"] for layer in call(server.host, "GET", "/v2/jq/manifests/latest")
          .json()["layers"]}  # fmt: skip
    hello = {layer["digest"] for layer in call(server.host, "GET", "/v2/hello/manifests/latest")
             .json()["layers"]}  # fmt: skip
    age(storage, 3 * HOUR)

    failures: list[str] = []
    stop = threading.Event()

    def pull_hello() -> None:
        while not stop.is_set():
            manifest = call(server.host, "GET", "/v2/hello/manifests/latest")
            if manifest.status != 200:
                failures.append(f"manifest {manifest.status}")
                continue
            for layer in manifest.json()["layers"]:
                reply = call(server.host, "GET", f"/v2/hello/blobs/{layer['digest']}")
                if reply.status != 200:
                    failures.append(f"blob {layer['digest']} {reply.status}")

    puller = threading.Thread(target=pull_hello)
    puller.start()
    try:
        gc(server.storage, "--keep-days", "0")  # every image expires: tombstones
        for path in (server.storage / "documents" / "expired").rglob("*.json"):
            os.utime(path, (0, time.time() - 2 * HOUR))  # as if the grace passed
        out = gc(server.storage, "--keep-days", "0")
        time.sleep(1)
    finally:
        stop.set()
        puller.join()
    assert failures == []
    assert "removed" in out
    left = blobs(storage)
    assert jq - hello and not (jq - hello) & left  # jq's own layers are gone
    assert hello <= left
    assert call(server.host, "GET", "/v2/jq/manifests/latest").status == 200
    storage.close()


def gc(storage: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "nixery", "gc", "--storage-path", str(storage), *args],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return proc.stdout


@pytest.mark.e2e
def test_gc_dry_run_reports_without_removing(start_server: StartServer) -> None:
    server = start_server()
    assert call(server.host, "GET", "/v2/hello/manifests/latest").status == 200
    before = sorted(p.name for p in (server.storage / "blobs" / "sha256").iterdir())
    out = gc(server.storage, "--keep-days", "0", "--grace", "0", "--dry-run")
    assert out.startswith("would remove") and "expired 1 images" in out
    assert sorted(p.name for p in (server.storage / "blobs" / "sha256").iterdir()) == before


# -- Nix GC roots -------------------------------------------------------------------------


def roots_under(prefix: str) -> list[str]:
    listing = subprocess.run(
        ["nix-store", "--gc", "--print-roots"], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in listing.splitlines() if line.startswith(prefix)]


@pytest.mark.e2e
def test_store_paths_have_roots_only_while_an_image_is_built(tmp_path: Path) -> None:
    nix = Nix(timeout=120)
    packages = nix.resolve(NixSource("path", str(FIXTURE_PKGS)), "x86_64-linux", ["hello"])
    with temporary_roots() as roots:
        outs = nix.realise(packages, roots=roots)
        held = roots_under(roots)
        assert held and all(line.endswith(outs[0]) for line in held)
    assert roots_under(roots) == []


@pytest.mark.e2e
def test_a_built_image_leaves_no_gc_root(start_server: StartServer, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    scratch.chmod(0o755)
    server = start_server(env={"TMPDIR": str(scratch)})
    assert call(server.host, "GET", "/v2/hello/manifests/latest").status == 200
    assert roots_under(str(scratch)) == []
    assert list(scratch.glob("nixery-roots-*")) == []


def test_without_grace_one_run_frees_everything_expired(tmp_path: Path) -> None:
    """For a stopped server: no tombstones, no waiting."""
    storage = FilesystemStorage(tmp_path)
    old = store_image(storage, "old", [b"only-old"])
    age(storage, 10 * DAY)
    kept = store_image(storage, "kept", [b"only-kept"])
    report = collect(storage, keep=7 * DAY, grace=0)
    assert report.expired_images == ["images/old.json"] and report.dropped_tombstones == []
    assert {old.layers[0].digest, old.manifests["OCI"].digest} <= set(report.removed_blobs)
    assert {kept.layers[0].digest, kept.manifests["OCI"].digest} <= blobs(storage)
    assert not set(report.removed_blobs) & blobs(storage)
    assert list(storage.list_documents("expired/")) == []
    storage.close()
