"""Manifests served from memory: fast, and never hiding a lost blob."""

from __future__ import annotations

import json

import pytest

from nixery.assembly.manifest import Document
from nixery.images.served import ServedImages
from tests.conftest import StartServer
from tests.http import call


@pytest.mark.e2e
def test_a_blob_lost_under_a_kept_manifest_is_rebuilt(start_server: StartServer) -> None:
    server = start_server()
    first = call(server.host, "GET", "/v2/hello/manifests/latest")
    assert first.status == 200
    again = call(server.host, "GET", "/v2/hello/manifests/latest")  # kept in memory now
    assert again.status == 200 and again.body == first.body
    layer = max(first.json()["layers"], key=lambda entry: entry["size"])["digest"]
    (server.storage / "blobs" / "sha256" / layer.split(":")[1]).unlink()

    assert call(server.host, "GET", f"/v2/hello/blobs/{layer}").status == 404
    # The lost blob was noticed: the image is checked in storage and rebuilt.
    rebuilt = call(server.host, "GET", "/v2/hello/manifests/latest")
    assert rebuilt.status == 200 and rebuilt.body == first.body
    blob = call(server.host, "GET", f"/v2/hello/blobs/{layer}")
    assert blob.status == 200
    assert "lost blobs; rebuilding" in server.log_text()


@pytest.mark.e2e
def test_a_manifest_pinned_by_digest_whose_blob_was_lost_is_found_again(
    start_server: StartServer,
) -> None:
    server = start_server()
    first = call(server.host, "GET", "/v2/hello/manifests/latest")
    digest = first.require_header("Docker-Content-Digest")
    assert call(server.host, "GET", f"/v2/hello/manifests/{digest}").status == 200
    (server.storage / "blobs" / "sha256" / digest.split(":")[1]).unlink()

    assert call(server.host, "GET", f"/v2/hello/blobs/{digest}").status == 404
    assert call(server.host, "GET", f"/v2/hello/manifests/{digest}").status == 404
    # By tag, the image is rebuilt with the same bytes, so the digest works again.
    assert call(server.host, "GET", "/v2/hello/manifests/latest").body == first.body
    assert call(server.host, "GET", f"/v2/hello/manifests/{digest}").status == 200


def test_kept_entries_are_checked_again_after_the_interval() -> None:
    now = [0.0]
    served = ServedImages(revalidate=5, clock=lambda: now[0])
    document = Document("application/vnd.oci.image.manifest.v1+json", b'{"layers": []}')
    served.keep_document(document, ["sha256:" + "a" * 64])
    assert served.document(document.digest) is document
    now[0] = 5.0
    assert served.document(document.digest) is None  # this caller asks storage
    assert served.document(document.digest) is document  # the others are served meanwhile
    served.keep_document(document)
    now[0] = 9.0
    assert served.document(document.digest) is document


def test_a_missing_blob_forgets_what_references_it() -> None:
    served = ServedImages()
    lost, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    one = Document("application/vnd.oci.image.manifest.v1+json", json.dumps([1]).encode())
    two = Document("application/vnd.oci.image.manifest.v1+json", json.dumps([2]).encode())
    served.keep_document(one, [lost])
    served.keep_document(two, [other])
    served.blob_missing(lost)
    assert served.document(one.digest) is None
    assert served.document(two.digest) is two
    served.blob_missing(two.digest)  # the manifest itself
    assert served.document(two.digest) is None
