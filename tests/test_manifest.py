from __future__ import annotations

import json

from nixery.assembly.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Format,
    image_config,
    index_document,
    manifest_document,
    media_type_of,
    negotiate,
)
from nixery.packages.platforms import AMD64, ARM64


def test_accept_is_a_set_over_all_lines() -> None:
    skopeo = [
        OCI_MANIFEST,
        DOCKER_MANIFEST,
        "application/vnd.docker.distribution.manifest.v1+json",
        DOCKER_LIST,
    ]
    assert negotiate(skopeo).formats[0] is Format.OCI
    assert negotiate(list(reversed(skopeo))).formats[0] is Format.OCI
    containerd = [f"{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"]
    assert negotiate(containerd).formats == (Format.OCI, Format.DOCKER)
    assert negotiate(containerd).index


def test_docker_only_clients_get_docker() -> None:
    n = negotiate([f"{DOCKER_MANIFEST};q=0.9", DOCKER_LIST])
    assert n.formats == (Format.DOCKER,)
    assert n.index


def test_no_preference_means_oci_without_index() -> None:
    for accept in ([], [""], ["*/*"], ["application/vnd.docker.distribution.manifest.v1+json"]):
        n = negotiate(accept)
        assert n.formats == (Format.OCI,) and not n.index


def test_manifest_documents() -> None:
    config = image_config(AMD64, ["sha256:" + "1" * 64], ["nixery: hello"], ["bash"])
    assert config["rootfs"]["diff_ids"] == ["sha256:" + "1" * 64]
    assert config["config"]["Cmd"] == ["bash"]
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt" in config["config"]["Env"]
    layer = Descriptor(Format.DOCKER.layer_type, "sha256:" + "2" * 64, 10)
    cfg = Descriptor(Format.DOCKER.config_type, "sha256:" + "3" * 64, 5)
    doc = manifest_document(Format.DOCKER, cfg, [layer])
    body = json.loads(doc.data)
    assert body["mediaType"] == doc.media_type == DOCKER_MANIFEST
    assert media_type_of(doc.data) == DOCKER_MANIFEST
    index = index_document(Format.OCI, [(AMD64, doc.descriptor()), (ARM64, doc.descriptor())])
    platforms = [m["platform"] for m in json.loads(index.data)["manifests"]]
    assert platforms == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    assert media_type_of(b"not json") is None
    assert media_type_of(b'{"mediaType": "application/octet-stream"}') is None
