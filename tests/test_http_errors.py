"""Error paths of the registry API, against the real server."""

from __future__ import annotations

import pytest

from tests.conftest import Server
from tests.http import call, raw_status_line

pytestmark = pytest.mark.e2e
OCI = "application/vnd.oci.image.manifest.v1+json"


def assert_error(reply, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert reply.status == status, reply.body
    assert reply.header("Content-Type").startswith("application/json")
    assert reply.header("Docker-Distribution-API-Version") == "registry/2.0"
    assert reply.error_codes() == [code]


def test_unknown_packages_are_all_named(server: Server) -> None:
    reply = call(server.host, "GET", "/v2/hello/nope/alsonope/manifests/latest")
    assert_error(reply, 404, "MANIFEST_UNKNOWN")
    assert reply.json()["errors"][0]["detail"] == {"unknown_packages": ["alsonope", "nope"]}


def test_invalid_name_tag_digest(server: Server) -> None:
    assert_error(call(server.host, "GET", "/v2/Hello/manifests/latest"), 400, "NAME_INVALID")
    assert_error(call(server.host, "GET", "/v2/hello/manifests/-bad"), 400, "TAG_INVALID")
    assert_error(call(server.host, "GET", "/v2/hello/manifests/sha256:xyz"), 400, "DIGEST_INVALID")
    assert_error(call(server.host, "GET", "/v2/hello/blobs/sha256:abc"), 400, "DIGEST_INVALID")


def test_unknown_blob_and_manifest_digest(server: Server) -> None:
    missing = "sha256:" + "0" * 64
    assert_error(call(server.host, "GET", f"/v2/hello/blobs/{missing}"), 404, "BLOB_UNKNOWN")
    head = call(server.host, "HEAD", f"/v2/hello/blobs/{missing}")
    assert head.status == 404 and head.body == b""
    assert_error(
        call(server.host, "GET", f"/v2/hello/manifests/{missing}"), 404, "MANIFEST_UNKNOWN"
    )


def test_build_failure_is_a_500_with_the_log(server: Server) -> None:
    reply = call(server.host, "GET", "/v2/broken/manifests/latest")
    assert_error(reply, 500, "UNKNOWN")
    assert "broken on purpose" in reply.json()["errors"][0]["detail"]["log"]


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
def test_write_methods_are_unsupported(server: Server, method: str) -> None:
    for path in (
        "/v2/hello/manifests/latest",
        "/v2/hello/blobs/uploads/",
        "/v2/hello/blobs/sha256:" + "0" * 64,
    ):
        assert_error(call(server.host, method, path), 405, "UNSUPPORTED")


def test_manifest_head_get_and_blobs(server: Server) -> None:
    get = call(server.host, "GET", "/v2/hello/manifests/latest", {"Accept": OCI})
    head = call(server.host, "HEAD", "/v2/hello/manifests/latest", {"Accept": OCI})
    assert get.status == head.status == 200
    for name in ("Content-Type", "Content-Length", "Docker-Content-Digest", "ETag"):
        assert get.header(name) == head.header(name), name
    assert head.body == b""
    digest = get.header("Docker-Content-Digest")
    by_digest = call(server.host, "GET", f"/v2/hello/manifests/{digest}")
    assert by_digest.body == get.body and by_digest.header("Content-Type") == OCI

    layer = get.json()["layers"][0]
    blob = call(server.host, "GET", f"/v2/hello/blobs/{layer['digest']}")
    assert blob.status == 200 and len(blob.body) == layer["size"]
    assert blob.header("Docker-Content-Digest") == layer["digest"]
    part = call(server.host, "GET", f"/v2/hello/blobs/{layer['digest']}", {"Range": "bytes=10-19"})
    assert part.status == 206 and part.body == blob.body[10:20]
    bad = call(
        server.host,
        "GET",
        f"/v2/hello/blobs/{layer['digest']}",
        {"Range": f"bytes={layer['size'] + 5}-"},
    )
    assert bad.status == 416


def test_unknown_packages_come_with_suggestions(server: Server) -> None:
    reply = call(server.host, "GET", "/v2/shell/helo/gti/manifests/latest")
    assert_error(reply, 404, "MANIFEST_UNKNOWN")
    detail = reply.json()["errors"][0]["detail"]
    assert detail["unknown_packages"] == ["gti", "helo"]
    assert detail["suggestions"]["helo"][0] == "hello"
    assert detail["suggestions"]["gti"] == ["git"]


@pytest.mark.parametrize("name", ["Accept", "If-None-Match", "Range", "Authorization"])
def test_headers_that_are_not_utf8_are_no_server_error(server: Server, name: str) -> None:
    missing = "sha256:" + "0" * 64
    for path in ("/v2/hello/manifests/latest", f"/v2/hello/blobs/{missing}"):
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
        request += name.encode() + b": \xff\xfe junk\r\n\r\n"
        status_line = raw_status_line(server.host, request)
        assert int(status_line.split()[1]) < 500, (name, path, status_line)
