"""The pull section of the OCI distribution spec, walked against the real
server configured for two platforms (one server for the whole module)."""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Iterator

import pytest

from nixery.assembly.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.accept import CLIENT_ACCEPTS, CLIENT_DIALECTS
from tests.conftest import Server, StartServer
from tests.http import Headers, Reply, call, raw_status_line

pytestmark = pytest.mark.e2e

IMAGE = "shell/hello"
MANIFEST_HEADERS = ("Content-Type", "Content-Length", "Docker-Content-Digest", "ETag")
ZERO = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def server(start_module_server: StartServer) -> Iterator[Server]:
    yield start_module_server("--platforms", "linux/amd64,linux/arm64")


# A list is only sent to a client that also names the manifest type of its entries.
OCI_LISTS = f"{OCI_INDEX}, {OCI_MANIFEST}"
DOCKER_LISTS = f"{DOCKER_LIST}, {DOCKER_MANIFEST}"
ACCEPTS = (OCI_LISTS, DOCKER_LISTS, OCI_MANIFEST, DOCKER_MANIFEST, None)


@pytest.fixture(scope="module")
def tagged(server: Server) -> dict[str | None, Reply]:
    """`latest` as each kind of client gets it; a tag request runs Nix, so once per kind."""
    return {accept: manifest(server, "latest", accept) for accept in ACCEPTS}


def get(server: Server, path: str, headers: Headers | None = None, method: str = "GET") -> Reply:
    return call(server.host, method, path, headers)


def manifest(server: Server, ref: str, accept: str | None = None, name: str = IMAGE) -> Reply:
    reply = get(server, f"/v2/{name}/manifests/{ref}", {"Accept": accept} if accept else None)
    assert reply.status == 200, reply.body
    return reply


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply.body
    assert reply.header("Docker-Distribution-API-Version") == "registry/2.0"
    if reply.body:  # HEAD answers carry no body
        assert reply.require_header("Content-Type").startswith("application/json")
        assert reply.error_codes() == [code]


def test_base_endpoint(server: Server) -> None:
    for path in ("/v2/", "/v2"):
        for method in ("GET", "HEAD"):
            reply = get(server, path, method=method)
            assert reply.status == 200
            assert reply.header("Docker-Distribution-API-Version") == "registry/2.0"
    assert get(server, "/v2/").json() == {}


@pytest.mark.parametrize(
    "accept, media_type",
    [
        (OCI_LISTS, OCI_INDEX),
        (DOCKER_LISTS, DOCKER_LIST),
        (OCI_MANIFEST, OCI_MANIFEST),
        (DOCKER_MANIFEST, DOCKER_MANIFEST),
        (None, OCI_MANIFEST),
    ],
)
def test_manifest_get_and_head_agree(
    server: Server, tagged: dict[str | None, Reply], accept: str | None, media_type: str
) -> None:
    headers = {"Accept": accept} if accept else {}
    by_tag = tagged[accept]
    digest = by_tag.header("Docker-Content-Digest")
    assert by_tag.header("Content-Type") == by_tag.json()["mediaType"] == media_type
    assert digest == sha256(by_tag.body)
    assert by_tag.header("ETag") == f'"{digest}"'
    assert by_tag.header("Content-Length") == str(len(by_tag.body))
    head = get(server, f"/v2/{IMAGE}/manifests/latest", headers, method="HEAD")
    by_digest = get(server, f"/v2/{IMAGE}/manifests/{digest}", headers)
    head_by_digest = get(server, f"/v2/{IMAGE}/manifests/{digest}", headers, method="HEAD")
    for reply in (head, by_digest, head_by_digest):
        assert reply.status == 200
        assert reply.body == (by_tag.body if reply is by_digest else b"")
        for name in MANIFEST_HEADERS:
            assert reply.header(name) == by_tag.header(name), name


def test_manifests_vary_by_accept(tagged: dict[str | None, Reply]) -> None:
    assert {reply.header("Vary") for reply in tagged.values()} == {"Accept"}


def test_if_none_match_answers_304(server: Server, tagged: dict[str | None, Reply]) -> None:
    first = tagged[OCI_LISTS]
    etag = first.require_header("ETag")
    digest = first.require_header("Docker-Content-Digest")
    cases = [("latest", "GET", etag), ("latest", "HEAD", "*")]
    cases += [(digest, m, v) for m in ("GET", "HEAD") for v in (etag, f'"x", W/{etag}', "*")]
    for ref, method, value in cases:
        path = f"/v2/{IMAGE}/manifests/{ref}"
        reply = get(server, path, {"Accept": OCI_LISTS, "If-None-Match": value}, method)
        assert reply.status == 304 and reply.body == b""
        assert reply.header("ETag") == etag
        assert reply.header("Docker-Content-Digest") == digest
    stale = get(server, f"/v2/{IMAGE}/manifests/{digest}", {"If-None-Match": f'"{ZERO}"'})
    assert stale.status == 200
    layer = tagged[OCI_MANIFEST].json()["layers"][0]["digest"]
    blob = get(server, f"/v2/{IMAGE}/blobs/{layer}", {"If-None-Match": f'"{layer}"'})
    assert blob.status == 304 and blob.body == b""


@pytest.mark.parametrize("client", sorted(CLIENT_ACCEPTS))
def test_each_client_accept_shape_gets_a_list_it_named(server: Server, client: str) -> None:
    lines = [("Accept", line) for line in CLIENT_ACCEPTS[client]]
    reply = get(server, f"/v2/{IMAGE}/manifests/latest", lines)
    assert reply.status == 200
    list_format = CLIENT_DIALECTS[client][1]
    assert reply.header("Content-Type") == reply.json()["mediaType"] == list_format.index_type
    assert {m["mediaType"] for m in reply.json()["manifests"]} == {list_format.manifest_type}


def test_a_list_refused_with_q_zero_is_not_sent(server: Server) -> None:
    accept = f"{OCI_INDEX};q=0, {DOCKER_LIST}; q=0.0, {OCI_MANIFEST}, {DOCKER_MANIFEST};q=0.5"
    reply = get(server, f"/v2/{IMAGE}/manifests/latest", {"Accept": accept})
    assert reply.status == 200
    assert reply.header("Content-Type") == reply.json()["mediaType"] == OCI_MANIFEST


def test_index_holds_one_manifest_per_platform_in_its_own_dialect(
    server: Server, tagged: dict[str | None, Reply]
) -> None:
    for lists, manifest_type in ((OCI_LISTS, OCI_MANIFEST), (DOCKER_LISTS, DOCKER_MANIFEST)):
        index = tagged[lists].json()
        platforms = [entry["platform"] for entry in index["manifests"]]
        assert platforms == [
            {"architecture": "amd64", "os": "linux"},
            {"architecture": "arm64", "os": "linux", "variant": "v8"},
        ]
        for entry in index["manifests"]:
            assert entry["mediaType"] == manifest_type
            # Asked by digest, the Accept header has no say.
            got = manifest(server, entry["digest"], OCI_INDEX)
            assert got.header("Content-Type") == manifest_type
            assert sha256(got.body) == entry["digest"] and len(got.body) == entry["size"]
            config_digest = got.json()["config"]["digest"]
            config = get(server, f"/v2/{IMAGE}/blobs/{config_digest}").json()
            assert config["architecture"] == entry["platform"]["architecture"]
        # A client that takes no list gets the first platform's manifest.
        single = tagged[manifest_type]
        assert single.header("Docker-Content-Digest") == index["manifests"][0]["digest"]


def test_arm64_meta_package_is_one_arm64_image(server: Server) -> None:
    reply = manifest(server, "latest", OCI_INDEX, name="arm64/hello")
    assert reply.header("Content-Type") == OCI_MANIFEST
    config_digest = reply.json()["config"]["digest"]
    config = get(server, f"/v2/arm64/hello/blobs/{config_digest}").json()
    assert (config["os"], config["architecture"], config["variant"]) == ("linux", "arm64", "v8")


def test_manifests_are_also_blobs(server: Server, tagged: dict[str | None, Reply]) -> None:
    digests = [reply.header("Docker-Content-Digest") for reply in tagged.values()]
    for digest in digests:
        blob = get(server, f"/v2/{IMAGE}/blobs/{digest}")
        assert blob.status == 200 and sha256(blob.body) == digest
        assert blob.header("Docker-Content-Digest") == digest
        assert blob.body == manifest(server, digest).body


def test_list_digests_survive_a_restart(
    server: Server, tagged: dict[str | None, Reply], start_server: StartServer
) -> None:
    digests = {t: tagged[a].body for t, a in ((OCI_INDEX, OCI_LISTS), (DOCKER_LIST, DOCKER_LISTS))}
    again = start_server("--platforms", "linux/amd64,linux/arm64", storage=server.storage)
    for media_type, body in digests.items():
        for method in ("GET", "HEAD"):
            reply = get(again, f"/v2/{IMAGE}/manifests/{sha256(body)}", method=method)
            assert reply.status == 200
            assert reply.header("Content-Type") == media_type
            assert reply.body == (body if method == "GET" else b"")
    assert "built" not in again.log_text()


def test_blob_get_head_and_ranges(server: Server, tagged: dict[str | None, Reply]) -> None:
    layer = tagged[OCI_MANIFEST].json()["layers"][0]
    path, size = f"/v2/{IMAGE}/blobs/{layer['digest']}", layer["size"]
    whole = get(server, path)
    head = get(server, path, method="HEAD")
    assert whole.status == head.status == 200
    assert sha256(whole.body) == layer["digest"] and len(whole.body) == size
    for name in ("Content-Length", "Docker-Content-Digest", "ETag", "Accept-Ranges"):
        assert whole.header(name) == head.header(name), name
    assert head.header("Content-Length") == str(size) and head.body == b""

    for spec, (start, end) in {
        "bytes=0-99": (0, 100),
        "bytes=100-": (100, size),
        f"bytes={size - 7}-{size + 50}": (size - 7, size),
        "bytes=-7": (size - 7, size),
    }.items():
        for method in ("GET", "HEAD"):
            part = get(server, path, {"Range": spec}, method)
            assert part.status == 206, spec
            assert part.header("Content-Range") == f"bytes {start}-{end - 1}/{size}"
            assert part.header("Content-Length") == str(end - start)
            assert part.body == (whole.body[start:end] if method == "GET" else b"")
    for ignored in ("items=0-1", "bytes=0-1,5-6"):
        assert get(server, path, {"Range": ignored}).body == whole.body
    # If-Range: the range only for this very content (strong ETag match), else all of it.
    etag = whole.require_header("ETag")
    for if_range, status in ((etag, 206), (f'"{ZERO}"', 200), (f"W/{etag}", 200),
                             ("Wed, 21 Oct 2015 07:28:00 GMT", 200)):  # fmt: skip
        reply = get(server, path, {"Range": "bytes=0-9", "If-Range": if_range})
        assert reply.status == status, if_range
        assert reply.body == (whole.body[:10] if status == 206 else whole.body)
    bad = get(server, path, {"Range": f"bytes={size}-"})
    assert_error(bad, 416, "RANGE_INVALID")
    assert bad.header("Content-Range") == f"bytes */{size}"


def test_missing_and_invalid_blobs(server: Server) -> None:
    for digest in (ZERO, "sha512:" + "0" * 128, "tarsum.v1+sha256:abc"):
        assert_error(get(server, f"/v2/{IMAGE}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
        head = get(server, f"/v2/{IMAGE}/blobs/{digest}", method="HEAD")
        assert head.status == 404 and head.body == b""
    for digest in ("sha256:abc", "sha256:" + "A" * 64, "nocolon", "sha256:"):
        assert_error(get(server, f"/v2/{IMAGE}/blobs/{digest}"), 400, "DIGEST_INVALID")
    assert_error(get(server, f"/v2/Bad/blobs/{ZERO}"), 400, "NAME_INVALID")


def test_unresolvable_references_are_404_and_build_nothing(
    server: Server, tagged: dict[str | None, Reply]
) -> None:
    layer = tagged[OCI_MANIFEST].json()["layers"][0]["digest"]
    before = server.log_text().count(" built ")
    cases = [
        ("hello", "v1.0"),  # a local path only has `latest`
        ("hello", "sha512:" + "1" * 128),  # never stored
        ("hello", ZERO),
        ("hello", layer),  # a blob, but not a manifest
        ("notapackage", "latest"),  # an attribute that is a string
        ("haskellpackages", "latest"),  # a set, not a derivation
        ("shell/nosuchpackage", "latest"),
    ]
    for name, ref in cases:
        for method in ("GET", "HEAD"):
            reply = get(server, f"/v2/{name}/manifests/{ref}", {"Accept": OCI_INDEX}, method)
            assert_error(reply, 404, "MANIFEST_UNKNOWN")
    assert server.log_text().count(" built ") == before


def test_malformed_requests_are_400(server: Server) -> None:
    for path, code in (
        ("/v2/Hello/manifests/latest", "NAME_INVALID"),
        ("/v2/hello//x/manifests/latest", "NAME_INVALID"),
        ("/v2/" + "/".join(["hello"] * 65) + "/manifests/latest", "NAME_INVALID"),
        ("/v2/hello/manifests/-bad", "TAG_INVALID"),
        ("/v2/hello/manifests/" + "a" * 129, "TAG_INVALID"),
        ("/v2/hello/manifests/sha256:xyz", "DIGEST_INVALID"),
    ):
        assert_error(get(server, path), 400, code)


def test_tags_list(server: Server) -> None:
    reply = get(server, f"/v2/{IMAGE}/tags/list")
    assert reply.status == 200 and reply.header("Content-Type") == "application/json"
    assert reply.json() == {"name": IMAGE, "tags": ["latest"]}
    for query, tags in (
        ("n=1", ["latest"]),
        ("n=0", []),
        ("last=latest", []),
        ("n=5&last=a", ["latest"]),
        ("last=", ["latest"]),
        ("n=1&last=", ["latest"]),
    ):
        reply = get(server, f"/v2/{IMAGE}/tags/list?{query}")
        assert reply.status == 200 and reply.json()["tags"] == tags, query
        assert reply.header("Link") is None
    assert_error(get(server, f"/v2/{IMAGE}/tags/list?n=-1"), 400, "PAGINATION_NUMBER_INVALID")
    assert_error(get(server, "/v2/Hello/tags/list"), 400, "NAME_INVALID")


def test_referrers_list_the_sboms_of_each_image_manifest(
    server: Server, tagged: dict[str | None, Reply]
) -> None:
    # A multi-platform list has no referrers; an unknown digest neither.
    empty = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    listed = tagged[OCI_LISTS].header("Docker-Content-Digest")
    for ref in (listed, ZERO, "sha512:" + "1" * 128):
        reply = get(server, f"/v2/{IMAGE}/referrers/{ref}")
        assert reply.status == 200
        assert reply.header("Content-Type") == OCI_INDEX
        assert reply.json() == empty
        assert reply.header("OCI-Filters-Applied") is None
    # Every platform's manifest, in both dialects, has an SPDX and a CycloneDX SBOM.
    subjects = [m["digest"] for m in tagged[OCI_LISTS].json()["manifests"]]
    subjects += [m["digest"] for m in tagged[DOCKER_LISTS].json()["manifests"]]
    assert len(set(subjects)) == 4
    for subject in subjects:
        reply = get(server, f"/v2/{IMAGE}/referrers/{subject}")
        assert reply.status == 200 and reply.header("Content-Type") == OCI_INDEX
        types = sorted(m["artifactType"] for m in reply.json()["manifests"])
        assert types == ["application/spdx+json", "application/vnd.cyclonedx+json"]
        for entry in reply.json()["manifests"]:
            artifact = manifest(server, entry["digest"], OCI_MANIFEST)
            assert artifact.json()["subject"]["digest"] == subject
            assert sha256(artifact.body) == entry["digest"]
        filtered = get(
            server, f"/v2/{IMAGE}/referrers/{subject}?artifactType=application/spdx%2Bjson"
        )
        assert filtered.header("OCI-Filters-Applied") == "artifactType"
        assert [m["artifactType"] for m in filtered.json()["manifests"]] == [
            "application/spdx+json"
        ]
        none = get(server, f"/v2/{IMAGE}/referrers/{subject}?artifactType=application/x.other")
        assert none.header("OCI-Filters-Applied") == "artifactType"
        assert none.json() == empty
    assert_error(get(server, f"/v2/{IMAGE}/referrers/sha256:abc"), 400, "DIGEST_INVALID")
    assert_error(get(server, f"/v2/Bad/referrers/{listed}"), 400, "NAME_INVALID")


# Every push, delete and upload endpoint of the spec (end-4a to end-14).
WRITES = [
    ("POST", "/v2/hello/blobs/uploads/"),
    ("POST", f"/v2/hello/blobs/uploads/?digest={ZERO}"),
    ("POST", "/v2/hello/blobs/uploads/?digest-algorithm=sha512"),
    ("POST", f"/v2/hello/blobs/uploads/?mount={ZERO}&from=other"),
    ("PATCH", "/v2/hello/blobs/uploads/some-upload"),
    ("PUT", f"/v2/hello/blobs/uploads/some-upload?digest={ZERO}"),
    ("PUT", "/v2/hello/manifests/latest"),
    ("PUT", f"/v2/hello/manifests/{ZERO}?tag=a&tag=b"),
    ("DELETE", "/v2/hello/manifests/latest"),
    ("DELETE", f"/v2/hello/manifests/{ZERO}"),
    ("DELETE", f"/v2/hello/blobs/{ZERO}"),
    ("DELETE", "/v2/hello/blobs/uploads/some-upload"),
]


@pytest.mark.parametrize("method, path", WRITES)
def test_writes_are_unsupported(server: Server, method: str, path: str) -> None:
    reply = get(server, path, method=method)
    assert_error(reply, 405, "UNSUPPORTED")
    assert reply.header("Allow") == "GET, HEAD"


def test_every_other_method_is_unsupported_in_json(server: Server) -> None:
    """CORS preflights, WebDAV and made-up methods get the registry's 405, too."""
    for method in ("OPTIONS", "TRACE", "PROPFIND", "FROB"):
        for path in ("/v2/", "/v2", f"/v2/{IMAGE}/manifests/latest", f"/v2/{IMAGE}/blobs/{ZERO}",
                     "/", "/nope"):  # fmt: skip
            reply = get(server, path, method=method)
            assert_error(reply, 405, "UNSUPPORTED")
            assert reply.header("Allow") == "GET, HEAD", (method, path)


def test_paths_with_line_breaks_get_json_errors(server: Server) -> None:
    assert_error(get(server, "/nope%0Aline"), 404, "NAME_UNKNOWN")
    assert_error(get(server, "/nope%0Aline", method="PUT"), 405, "UNSUPPORTED")
    assert_error(get(server, f"/v2/{IMAGE}/manifests/a%0Ab"), 400, "TAG_INVALID")


def test_upload_locations_are_unknown(server: Server) -> None:
    for path in ("/v2/hello/blobs/uploads/", "/v2/hello/blobs/uploads/some-upload"):
        assert_error(get(server, path), 404, "BLOB_UPLOAD_UNKNOWN")


def test_tls_client_hello_gets_an_http_status_line(server: Server) -> None:
    """Go clients probe HTTPS first and fall back only on an HTTP answer."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a TLS handshake record
    status_line = raw_status_line(server.host, hello, timeout=10)
    assert status_line.startswith(b"HTTP/1.") and status_line.split()[1] == b"400", status_line


def test_every_response_is_tagged_and_errors_are_json(server: Server) -> None:
    for path in ("/nope", "/v2/_catalog", f"/v2/{IMAGE}/tags/list", "/v2/x/manifests/-"):
        reply = get(server, path)
        assert reply.header("Docker-Distribution-API-Version") == "registry/2.0"
        if reply.status >= 400:
            body = reply.json()
            assert set(body) == {"errors"} and body["errors"]
            assert all({"code", "message"} <= set(e) for e in body["errors"])
    assert json.loads(get(server, "/nope").body)["errors"][0]["code"] == "NAME_UNKNOWN"
