"""Images for nix-snapshotter: `serve --nix-snapshotter` annotates the store
layers of OCI manifests the way nix-snapshotter's own images are annotated.

The format is held to a fixture with the shape of the example manifest in
nix-snapshotter's documentation (tests/fixtures/nix-snapshotter). The
served manifests are read back with the rules nix-snapshotter applies, and
ordinary clients (skopeo, umoci, podman, containerd) still pull and run the
images, whose layers are the same blobs as without the option.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest

from nixery.assembly.manifest import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    Descriptor,
    Format,
    manifest_document,
    nix_layer_annotations,
)
from tests.clients import (
    PODMAN_RUN_FLAGS,
    Containerd,
    ContainersTool,
    bwrap_run,
    skopeo_copy,
    skopeo_inspect,
    umoci_unpack,
)
from tests.conftest import Server, StartServer, require
from tests.http import call

FIXTURE = Path(__file__).parent / "fixtures" / "nix-snapshotter" / "manifest.json"
# containerd passes a snapshotter only the annotations under this prefix.
INHERITED = "containerd.io/snapshot/"
NIX_LAYER = "containerd.io/snapshot/nix-layer"
STORE_PATH_KEY = re.compile(r"containerd\.io/snapshot/nix-store-path\.(0|[1-9][0-9]*)")
STORE_PATH = re.compile(r"/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+._?=-]+")
IMAGE = "shell/hello"
GREETING = "Hello, world!"


def nix_store_paths(layer: dict[str, Any]) -> list[str] | None:
    """What nix-snapshotter takes from a layer descriptor: None if it is not a
    Nix layer, else its store paths by their number. The numbers must run
    from 0 without gaps and every value must be a store path."""
    labels = {k: v for k, v in (layer.get("annotations") or {}).items() if k.startswith(INHERITED)}
    if NIX_LAYER not in labels:
        return None
    assert labels[NIX_LAYER] == "true"
    numbered = {}
    for key, value in labels.items():
        match = STORE_PATH_KEY.fullmatch(key)
        if match:
            assert STORE_PATH.fullmatch(value), value
            numbered[int(match.group(1))] = value
    assert sorted(numbered) == list(range(len(numbered)))
    assert set(labels) == {NIX_LAYER, *(f"{INHERITED}nix-store-path.{i}" for i in numbered)}
    return [numbered[i] for i in range(len(numbered))]


# -- the format -------------------------------------------------------------


def test_annotations_match_the_documented_example() -> None:
    fixture = json.loads(FIXTURE.read_text())
    (layer,) = fixture["layers"]
    paths = nix_store_paths(layer)
    assert paths is not None and len(paths) == 5
    ours = Descriptor(
        layer["mediaType"], layer["digest"], layer["size"], nix_layer_annotations(paths)
    )
    assert ours.to_json() == layer  # field names, keys, numbering and values


def test_a_manifest_carries_annotations_only_where_given() -> None:
    config = Descriptor(Format.OCI.config_type, "sha256:" + "1" * 64, 3)
    paths = ["/nix/store/" + "a" * 32 + "-hello-2.12.1"]
    nix = Descriptor(Format.OCI.layer_type, "sha256:" + "2" * 64, 4, nix_layer_annotations(paths))
    root = Descriptor(Format.OCI.layer_type, "sha256:" + "3" * 64, 5)
    body = json.loads(manifest_document(Format.OCI, config, [nix, root]).data)
    assert [nix_store_paths(layer) for layer in body["layers"]] == [paths, None]
    assert "annotations" not in body["layers"][1] and "annotations" not in body["config"]
    assert "annotations" not in body


# -- through a real server and real clients ---------------------------------


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nix-snapshotter") / "storage"


@pytest.fixture(scope="module")
def registry(start_module_server: StartServer, storage: Path) -> Server:
    return start_module_server("--nix-snapshotter", storage=storage)


@pytest.fixture(scope="module")
def plain(start_module_server: StartServer, storage: Path) -> Server:
    """A server without the option, on the same storage."""
    return start_module_server(storage=storage)


def get_manifest(server: Server, accept: str, image: str = IMAGE) -> tuple[bytes, dict[str, Any]]:
    reply = call(server.host, "GET", f"/v2/{image}/manifests/latest", {"Accept": accept})
    assert reply.status == 200, reply.body
    return reply.body, reply.json()


def top_level_store_paths(server: Server, digest: str) -> list[str]:
    reply = call(server.host, "GET", f"/v2/{IMAGE}/blobs/{digest}")
    assert reply.status == 200
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(reply.body))) as archive:
        names = [m.name.rstrip("/") for m in archive.getmembers()]
    return sorted("/" + n for n in names if n.startswith("nix/store/") and n.count("/") == 2)


@pytest.mark.e2e
def test_every_store_layer_names_exactly_its_store_paths(registry: Server) -> None:
    _, manifest = get_manifest(registry, OCI_MANIFEST)
    *store_layers, root = manifest["layers"]
    assert nix_store_paths(root) is None and "annotations" not in root
    seen: list[str] = []
    for layer in store_layers:
        paths = nix_store_paths(layer)
        assert paths is not None
        assert paths == top_level_store_paths(registry, layer["digest"])
        seen += paths
    assert len(seen) == len(set(seen))  # each store path in one layer only
    assert any(p.endswith("-hello") or "-hello-" in p for p in seen)


@pytest.mark.e2e
def test_the_layers_and_docker_manifests_are_those_of_a_plain_server(
    registry: Server, plain: Server
) -> None:
    annotated_bytes, annotated = get_manifest(registry, OCI_MANIFEST)
    plain_bytes, unannotated = get_manifest(plain, OCI_MANIFEST)
    assert annotated_bytes != plain_bytes
    strip = [
        {k: v for k, v in layer.items() if k != "annotations"} for layer in annotated["layers"]
    ]
    assert strip == unannotated["layers"]
    assert all("annotations" not in layer for layer in unannotated["layers"])
    # Docker's schema2 defines no annotations: its manifests stay as they were.
    assert get_manifest(registry, DOCKER_MANIFEST)[0] == get_manifest(plain, DOCKER_MANIFEST)[0]


@pytest.mark.e2e
def test_skopeo_and_umoci_pull_and_run(registry: Server, tmp_path: Path) -> None:
    require("skopeo", "umoci", "bwrap")
    raw = skopeo_inspect(registry.host, IMAGE, raw=True)
    assert raw["mediaType"] == OCI_MANIFEST and nix_store_paths(raw["layers"][0])
    skopeo_copy(registry.host, IMAGE, tmp_path / "oci")
    # The annotations travel with the image into the copy.
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    copied = json.loads((tmp_path / "oci" / "blobs" / "sha256" / digest).read_text())
    assert copied["layers"] == raw["layers"]
    rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
    assert bwrap_run(rootfs, "hello").strip() == GREETING


@pytest.mark.e2e
def test_podman_pulls_and_runs(registry: Server) -> None:
    require("podman", "runc")
    podman = ContainersTool("podman")
    ref = f"{registry.host}/{IMAGE}"
    try:
        podman("pull", "--quiet", "--tls-verify=false", ref)
        assert podman("run", "--rm", "--pull=never", *PODMAN_RUN_FLAGS, ref, "hello").strip() == (
            GREETING
        )
    finally:
        podman.close()


@pytest.mark.e2e
def test_containerd_pulls_the_annotated_manifest_and_runs(
    registry: Server, containerd: Containerd
) -> None:
    ref = f"{registry.host}/{IMAGE}:latest"
    containerd("image", "pull", "--plain-http", ref)
    # containerd keeps the manifest its unpacker (and so a snapshotter) reads.
    (line,) = [x for x in containerd("image", "ls").splitlines() if x.startswith(ref + " ")]
    digest = next(word for word in line.split() if word.startswith("sha256:"))
    stored = json.loads(containerd("content", "get", digest))
    assert stored["mediaType"] == OCI_MANIFEST
    assert all(nix_store_paths(layer) for layer in stored["layers"][:-1])
    container = "nix-snapshotter-" + registry.host.rsplit(":", 1)[1]
    assert containerd.run_container(ref, container, "hello").strip() == GREETING
    containerd("image", "rm", ref)
