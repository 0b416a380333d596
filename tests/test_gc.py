"""`nixery gc` and Nix GC roots, with the real storage, server and Nix.

The collector's scenarios run on both backends: a directory, and a bucket on
the real S3 server. S3 dates objects itself, so these tests do not age
entries: they write some before a `barrier()` and some after, and run gc at
a `now` that puts the barrier `keep` or `grace` seconds in the past.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nixery.assembly.manifest import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Format,
    config_document,
    index_document,
    manifest_document,
)
from nixery.images.model import BuiltImage, Layer
from nixery.images.referrers import artifact_blobs, store_sboms
from nixery.ops.gc import collect
from nixery.packages.graph import ClosureGraph, StorePath
from nixery.packages.nix import Nix, temporary_roots
from nixery.packages.platforms import AMD64, ARM64
from nixery.packages.sources import NixSource
from nixery.storage import FilesystemStorage, Storage
from nixery.storage.s3 import S3Storage
from tests.clients import skopeo_copy
from tests.conftest import FIXTURE_PKGS, StartServer, require
from tests.http import call
from tests.s3server import S3Server

HOUR = 3600.0
DAY = 86400.0

LISTS = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}  # a list is sent with its entries named


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.e2e)])
def storage(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Storage]:
    """Each backend, marking on every call (the throttle is tested on its own)."""
    st: Storage
    if request.param == "filesystem":
        st = FilesystemStorage(tmp_path, mark_interval=0)
    else:
        s3: S3Server = request.getfixturevalue("s3_server")
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        # Three objects a page: every listing below takes several pages.
        st = S3Storage(
            s3.new_bucket(), endpoint_url=s3.endpoint, path_style=True,
            mark_interval=0, list_page_size=3,
        )  # fmt: skip
    yield st
    st.close()


def barrier() -> float:
    """A whole second that every entry written before is older than and every
    entry written after is not, whatever the backend's timestamp precision."""
    now = time.time()
    moment = math.floor(now) + 1
    time.sleep(moment - now + 0.05)
    return float(moment)


def store_image(storage: Storage, key: str, layers: list[bytes]) -> BuiltImage:
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
    """Make every entry of a storage directory look `seconds` older."""
    for path in [*storage.blob_dir.iterdir(), *storage.doc_dir.rglob("*.json")]:
        st = path.stat()
        os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def blobs(storage: Storage) -> set[str]:
    return {entry.name for entry in storage.list_blobs()}


def documents(storage: Storage, prefix: str) -> set[str]:
    return {entry.name for entry in storage.list_documents(prefix)}


def test_gc_expires_old_images_and_frees_their_blobs_after_the_grace(storage: Storage) -> None:
    old = store_image(storage, "old", [b"shared", b"only-old"])
    abandoned = storage.put_blob(b"left by a failed build long ago")
    moment = barrier()
    new = store_image(storage, "new", [b"shared", b"only-new"])
    stray = storage.put_blob(b"written by a build in progress")
    before = blobs(storage)
    # An hour after the barrier: "old" was last used more than `keep` ago.
    now = moment + HOUR

    dry = collect(storage, keep=HOUR, grace=HOUR, dry_run=True, now=now)
    assert blobs(storage) == before
    assert documents(storage, "images/") == {"images/old.json", "images/new.json"}
    assert dry.expired_images == ["images/old.json"] and dry.removed_blobs == [abandoned]

    first = collect(storage, keep=HOUR, grace=HOUR, now=now)
    assert first.expired_images == ["images/old.json"]
    assert storage.get_document("images/old.json") is None
    assert storage.get_document("expired/images/old.json") is not None
    # The tombstone still protects the expired image's blobs, and the grace
    # the blob of a build in progress.
    assert blobs(storage) == before - {abandoned} and stray in before

    later = now + 2 * HOUR
    second = collect(storage, keep=DAY, grace=HOUR, now=later)
    only_old = old.layers[1].digest
    assert second.dropped_tombstones == ["expired/images/old.json"]
    removed = set(second.removed_blobs)
    assert only_old in removed and old.manifests["OCI"].digest in removed
    # Kept: everything the new image needs, including the shared layer.
    assert {layer.digest for layer in new.layers} <= blobs(storage)
    assert new.manifests["OCI"].digest in blobs(storage)
    assert stray in removed  # two hours later, no build is still writing it
    assert not removed & blobs(storage)
    assert f"layers/{only_old[7:19]}.json" in second.removed_layer_documents
    assert storage.get_document(f"layers/{only_old[7:19]}.json") is None
    assert storage.get_document(f"layers/{new.layers[1].digest[7:19]}.json") is not None
    assert documents(storage, "expired/") == set()


def test_marking_use_keeps_an_image_and_reused_blobs(storage: Storage) -> None:
    image = store_image(storage, "used", [b"layer"])
    idle = store_image(storage, "idle", [b"idle layer"])
    reused = storage.put_blob(b"a cached layer a build in progress reuses")
    unused = storage.put_blob(b"a cached layer nothing reuses")
    moment = barrier()
    storage.mark_used("images/used.json", *[layer.digest for layer in image.layers])
    storage.mark_used(None, reused)
    report = collect(storage, keep=HOUR, grace=HOUR, now=moment + HOUR)
    assert report.expired_images == ["images/idle.json"]
    assert report.removed_blobs == [unused]
    assert {reused, image.layers[0].digest, idle.layers[0].digest} <= blobs(storage)
    assert storage.get_document("images/used.json") is not None


def test_a_list_of_manifests_is_kept_while_every_manifest_it_lists_is(storage: Storage) -> None:
    amd = store_image(storage, "amd64", [b"amd64 layer"]).manifests["OCI"]
    arm = store_image(storage, "arm64", [b"arm64 layer"]).manifests["OCI"]
    orphan = store_image(storage, "orphan", [b"orphan layer"]).manifests["OCI"]
    storage.delete_document("images/orphan.json")  # that image is gone
    kept = [index_document(f, [(AMD64, amd), (ARM64, arm)]) for f in Format]
    stale = index_document(Format.OCI, [(AMD64, amd), (ARM64, orphan)])
    for document in [*kept, stale]:
        storage.put_blob(document.data)
    moment = barrier()
    report = collect(storage, keep=DAY, grace=HOUR, now=moment + 2 * HOUR)
    assert {d.digest for d in kept} <= blobs(storage)
    assert {stale.digest, orphan.digest} <= set(report.removed_blobs)
    assert {amd.digest, arm.digest} <= blobs(storage)


@pytest.mark.e2e
def test_an_image_pinned_by_its_list_digest_lives_as_long_as_its_images(
    start_server: StartServer,
) -> None:
    server = start_server("--platforms", "linux/amd64,linux/arm64")
    reply = call(server.host, "GET", "/v2/hello/manifests/latest", LISTS)
    assert reply.status == 200, reply.body
    digest = reply.require_header("Docker-Content-Digest")
    storage = FilesystemStorage(server.storage)
    try:
        # Two hours on, with the images in use: the list outlives the grace.
        collect(storage, keep=DAY, grace=HOUR, now=time.time() + 2 * HOUR)
        pinned = call(server.host, "GET", f"/v2/hello/manifests/{digest}", LISTS)
        assert pinned.status == 200 and pinned.body == reply.body
        # Once its images expire, the list goes with them.
        report = collect(storage, keep=HOUR, grace=0, now=time.time() + 2 * DAY)
        assert digest in report.removed_blobs
    finally:
        storage.close()


@pytest.mark.e2e
def test_images_pinned_by_digest_are_in_use(start_server: StartServer) -> None:
    server = start_server("--platforms", "linux/amd64,linux/arm64")
    index = LISTS
    digests = {}
    for image in ("hello", "jq", "wget"):
        reply = call(server.host, "GET", f"/v2/{image}/manifests/latest", index)
        assert reply.status == 200, reply.body
        digests[image] = reply.require_header("Docker-Content-Digest")
    platform_manifest = json.loads(reply.body)["manifests"][0]["digest"]  # of wget
    amd64_jq = json.loads(
        call(server.host, "GET", f"/v2/jq/manifests/{digests['jq']}", index).body
    )["manifests"][0]["digest"]
    storage = FilesystemStorage(server.storage)
    try:
        age(storage, 2 * HOUR)
        # Pinned pulls: hello by its list, jq by one platform's manifest.
        for image, digest in (("hello", digests["hello"]), ("jq", amd64_jq)):
            assert call(server.host, "GET", f"/v2/{image}/manifests/{digest}").status == 200
        report = collect(storage, keep=HOUR, grace=HOUR)
        expired = [
            BuiltImage.from_json(json.loads(storage.get_document("expired/" + name) or b""))
            for name in report.expired_images
        ]
        # Both platforms of wget (pulled by nobody since), and jq's arm64 image.
        assert len(expired) == 3
        assert {image.manifests["OCI"].digest for image in expired} >= {platform_manifest}
        assert sum("jq" in " ".join(image.packages) for image in expired) == 1
    finally:
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
    rounds = [0]  # whole pulls of hello: manifest and every blob
    progress = threading.Condition()
    stop = threading.Event()

    def pull_hello() -> None:
        try:
            while not stop.is_set():
                manifest = call(server.host, "GET", "/v2/hello/manifests/latest")
                if manifest.status != 200:
                    failures.append(f"manifest {manifest.status}")
                    continue
                for layer in manifest.json()["layers"]:
                    reply = call(server.host, "GET", f"/v2/hello/blobs/{layer['digest']}")
                    if reply.status != 200:
                        failures.append(f"blob {layer['digest']} {reply.status}")
                with progress:
                    rounds[0] += 1
                    progress.notify_all()
        except BaseException as exc:  # a dead puller must fail the test, not end it quietly
            failures.append(f"puller died: {exc!r}")
            raise
        finally:
            with progress:
                progress.notify_all()

    def pulled_after(count: int) -> bool:
        """Wait until `count` whole pulls are done (or the puller stopped)."""
        with progress:
            return progress.wait_for(lambda: rounds[0] >= count or not puller.is_alive(), 120)

    puller = threading.Thread(target=pull_hello)
    puller.start()
    try:
        assert pulled_after(1)  # pulling while gc starts
        gc(server.storage, "--keep-days", "0")  # every image expires: tombstones
        for path in (server.storage / "documents" / "expired").rglob("*.json"):
            os.utime(path, (0, time.time() - 2 * HOUR))  # as if the grace passed
        out = gc(server.storage, "--keep-days", "0")
        # Two more rounds: at least one whole pull began after gc had removed blobs.
        assert pulled_after(rounds[0] + 2)
    finally:
        stop.set()
        puller.join()
    assert rounds[0] >= 3 and failures == []
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
    with temporary_roots(str(tmp_path / "gc-roots")) as roots:
        outs = nix.realise(packages, roots=roots)
        held = roots_under(roots)
        assert held and all(line.endswith(outs[0]) for line in held)
    assert roots_under(roots) == []


@pytest.mark.e2e
def test_a_built_image_leaves_no_gc_root(start_server: StartServer, tmp_path: Path) -> None:
    roots = tmp_path / "gc-roots"
    server = start_server("--gc-roots-dir", str(roots))
    assert call(server.host, "GET", "/v2/hello/manifests/latest").status == 200
    assert roots_under(str(roots)) == []
    assert list(roots.iterdir()) == []


def test_without_grace_one_run_frees_everything_expired(storage: Storage) -> None:
    """For a stopped server: no tombstones, no waiting."""
    old = store_image(storage, "old", [b"only-old"])
    moment = barrier()
    kept = store_image(storage, "kept", [b"only-kept"])
    report = collect(storage, keep=HOUR, grace=0, now=moment + HOUR)
    assert report.expired_images == ["images/old.json"] and report.dropped_tombstones == []
    assert {old.layers[0].digest, old.manifests["OCI"].digest} <= set(report.removed_blobs)
    assert {kept.layers[0].digest, kept.manifests["OCI"].digest} <= blobs(storage)
    assert not set(report.removed_blobs) & blobs(storage)
    assert documents(storage, "expired/") == set()
    assert documents(storage, "layers/") == {f"layers/{kept.layers[0].digest[7:19]}.json"}


# -- S3, end to end -----------------------------------------------------------------------


def gc_s3(s3_server: S3Server, bucket: str, *args: str) -> str:
    """`nixery gc` on a bucket, configured as a deployment would: the backend
    and bucket in the environment, the credentials in the AWS SDK's variables."""
    env = {**os.environ, **s3_server.env}
    env |= {"NIXERY_STORAGE_BACKEND": "s3", "NIXERY_S3_BUCKET": bucket}
    proc = subprocess.run(
        [sys.executable, "-m", "nixery", "gc", "--s3-endpoint", s3_server.endpoint,
         "--s3-path-style", *args],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.e2e
def test_gc_on_s3_frees_an_expired_image_and_the_next_pull_builds_it_again(
    start_server: StartServer, s3_server: S3Server, tmp_path: Path
) -> None:
    require("skopeo")
    bucket = s3_server.new_bucket()
    server = start_server(
        "--storage-backend", "s3", "--s3-bucket", bucket, "--s3-endpoint", s3_server.endpoint,
        "--s3-path-style", env=s3_server.env,
    )  # fmt: skip
    skopeo_copy(server.host, "hello", tmp_path / "first")
    built = s3_server.keys(bucket, "blobs/")
    assert built and s3_server.keys(bucket, "documents/images/")

    # --keep-days 0: the image has expired, and becomes a tombstone for the
    # grace. A second run without grace drops it at once (how tombstones age
    # is tested with `collect(now=...)` on this same S3 server above).
    first = gc_s3(s3_server, bucket, "--keep-days", "0", "--grace", "3600")
    assert "expired 1 images" in first and "removed 0 blobs" in first
    assert s3_server.keys(bucket, "blobs/") == built
    assert s3_server.keys(bucket, "documents/images/") == {}
    assert s3_server.keys(bucket, "documents/expired/images/")
    second = gc_s3(s3_server, bucket, "--keep-days", "0", "--grace", "0")
    assert f"removed {len(built)} blobs" in second and "dropped 1 tombstones" in second
    for gone in (
        "blobs/",
        "marks/",
        "documents/images/",
        "documents/expired/",
        "documents/layers/",
    ):
        assert s3_server.keys(bucket, gone) == {}, gone
    assert s3_server.keys(bucket, "documents/layers/") == {}  # their blobs are gone

    skopeo_copy(server.host, "hello", tmp_path / "second")
    again = s3_server.keys(bucket, "blobs/")
    assert again == built  # the same bytes, built and stored again
    assert s3_server.broken_blobs(bucket) == []
    first_index = json.loads((tmp_path / "first" / "index.json").read_text())
    second_index = json.loads((tmp_path / "second" / "index.json").read_text())
    assert first_index["manifests"][0]["digest"] == second_index["manifests"][0]["digest"]


def test_roots_of_builds_whose_process_is_gone_are_removed(tmp_path: Path) -> None:
    # The roots directory outlives reboots; a crashed build must not pin its paths.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"build-{dead.pid}-abc123"
    live = tmp_path / f"build-{os.getpid()}-def456"
    other = tmp_path / "kept"
    for directory in (stale, live, other):
        directory.mkdir()
        (directory / "out").symlink_to("/nix/store/00000000000000000000000000000000-x")
    with temporary_roots(str(tmp_path)) as roots:
        assert Path(roots).name.startswith(f"build-{os.getpid()}-")
        assert not stale.exists()
        assert live.exists() and other.exists()
    assert not Path(roots).exists()


def store_image_with_sboms(storage: Storage, key: str, layer: bytes) -> BuiltImage:
    """An image with its bills of materials, stored as the builder stores them."""
    image = store_image(storage, key, [layer])
    path = "/nix/store/" + key.ljust(32, "0") + "-" + key
    graph = ClosureGraph((path,), {path: StorePath(path, 1, (), "0" * 64)})
    referrers = store_sboms(storage, key, image.manifests, graph, {})
    image = replace(image, referrers=referrers)
    storage.put_document(f"images/{key}.json", json.dumps(image.to_json()).encode())
    return image


def sbom_blobs(storage: Storage, image: BuiltImage) -> set[str]:
    """The referrers index, artifact manifests, their empty config and the SBOMs."""
    found = set().union(*(artifact_blobs(storage, i) for i in image.referrers.values()))
    assert len(found) == 1 + 2 + 1 + 2  # checked, so that the test sees them all
    return found


def test_sboms_live_and_go_with_their_image(storage: Storage) -> None:
    old = store_image_with_sboms(storage, "old", b"old layer")
    old_sboms = sbom_blobs(storage, old)
    moment = barrier()
    new = store_image_with_sboms(storage, "new", b"new layer")
    new_sboms = sbom_blobs(storage, new)
    shared = old_sboms & new_sboms  # the empty config only
    assert len(shared) == 1
    subject = old.manifests["OCI"].digest
    referrers_doc = f"referrers/{subject[7:]}.json"
    assert storage.get_document(referrers_doc) is not None

    # Both in use: every artifact is kept, however old.
    kept = collect(storage, keep=DAY, grace=HOUR, now=moment + 2 * HOUR)
    assert old_sboms | new_sboms <= blobs(storage) and not kept.removed_referrers_documents

    # "old" expires; after the grace its SBOMs go with it, and its referrers
    # document with its manifest. "new" keeps its own.
    collect(storage, keep=HOUR, grace=HOUR, now=moment + HOUR)
    report = collect(storage, keep=DAY, grace=HOUR, now=moment + 3 * HOUR)
    assert old_sboms - shared <= set(report.removed_blobs)
    assert new_sboms <= blobs(storage)
    assert report.removed_referrers_documents == [referrers_doc]
    assert storage.get_document(referrers_doc) is None
    assert documents(storage, "referrers/") == {f"referrers/{new.manifests['OCI'].digest[7:]}.json"}
