"""The protocol's pure parts: negotiation, ranges, conditional requests,
pagination and error codes; and the tags route in-process."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
from hypothesis import given

from nixery.assembly.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Format,
    negotiate,
)
from nixery.errors import ErrorCode, RegistryError
from nixery.http.app import byte_range, create_app, etag_matches, tag_page
from nixery.images.model import BuildSettings
from nixery.images.service import ImageService
from nixery.packages.nix import Nix
from nixery.packages.sources import SourceConfig, Sources
from nixery.storage import FilesystemStorage
from tests.accept import CLIENT_ACCEPTS, CLIENT_DIALECTS, accept_headers, served_types


@pytest.mark.parametrize("client", sorted(CLIENT_ACCEPTS))
def test_every_real_client_gets_a_dialect_it_named_whatever_the_order(client: str) -> None:
    lines = CLIENT_ACCEPTS[client]
    rng = random.Random(client)
    for _ in range(10):
        # Order carries no meaning: shuffle lines, and the types inside a line.
        shuffled = [", ".join(rng.sample(line.split(", "), line.count(",") + 1)) for line in lines]
        rng.shuffle(shuffled)
        got = negotiate(shuffled)
        assert (got.formats[0], got.index_format) == CLIENT_DIALECTS[client]
        assert negotiate([", ".join(shuffled)]) == got


@given(accept_headers())
def test_the_served_type_is_one_the_client_named(header: tuple[list[str], set[str]]) -> None:
    lines, named = header
    got = negotiate(lines)
    single = got.formats[0].manifest_type
    list_and_entries = (
        {got.index_format.index_type, got.index_format.manifest_type} if got.index_format else set()
    )
    assert {single} | list_and_entries <= served_types(named)
    if got.index_format is None:
        # No list is withheld from a client that named one with its entries.
        assert not any({f.index_type, f.manifest_type} <= named for f in Format)


def test_docker_only_clients_get_docker_and_a_manifest_list() -> None:
    got = negotiate([f"{DOCKER_MANIFEST}; q=0.5", f"{DOCKER_LIST};q=1"])
    assert got.formats == (Format.DOCKER,) and got.index_format is Format.DOCKER
    assert negotiate([DOCKER_MANIFEST]) == negotiate([DOCKER_MANIFEST.upper()])
    assert not negotiate([DOCKER_MANIFEST]).index


def test_a_list_is_only_sent_in_a_dialect_the_client_named() -> None:
    got = negotiate([f"{OCI_MANIFEST}, {DOCKER_MANIFEST}, {DOCKER_LIST}"])
    assert got.formats[0] is Format.OCI and got.index_format is Format.DOCKER
    got = negotiate([OCI_MANIFEST, DOCKER_MANIFEST])
    assert got.formats == (Format.OCI, Format.DOCKER) and got.index_format is None


def test_types_with_q_zero_are_refused() -> None:
    assert not negotiate([f"{OCI_INDEX};q=0, {OCI_MANIFEST}"]).index
    got = negotiate([f"{OCI_MANIFEST}; Q=0.000, {DOCKER_MANIFEST}", f"{DOCKER_LIST}; q=0.001"])
    assert got.formats == (Format.DOCKER,) and got.index_format is Format.DOCKER
    assert negotiate([f"{OCI_INDEX}; q=0.0, {DOCKER_MANIFEST};q=0"]).formats == (Format.OCI,)


def test_etag_matching() -> None:
    etag = '"sha256:' + "a" * 64 + '"'
    assert etag_matches(etag, etag)
    assert etag_matches(f'"other", W/{etag}', etag)
    assert etag_matches("*", etag)
    assert not etag_matches("", etag)
    assert not etag_matches(etag.strip('"'), etag)
    assert not etag_matches('"sha256:' + "b" * 64 + '"', etag)


def test_byte_ranges() -> None:
    assert byte_range(None, 100) is None
    assert byte_range("bytes=0-9", 100) == (0, 10)
    assert byte_range("bytes=90-", 100) == (90, 100)
    assert byte_range("bytes=95-200", 100) == (95, 100)
    assert byte_range("bytes=-5", 100) == (95, 100)
    # Other units and several ranges: the whole blob.
    assert byte_range("items=0-9", 100) is None
    assert byte_range("bytes=0-1,5-6", 100) is None
    for bad in ("bytes=100-", "bytes=200-300", "bytes=abc", "bytes=5-2"):
        with pytest.raises(RegistryError) as info:
            byte_range(bad, 100)
        assert info.value.code is ErrorCode.RANGE_INVALID and info.value.code.status == 416


def test_tag_pages() -> None:
    tags = ["v2", "latest", "1.0", "Z", "v10"]
    assert tag_page(tags, None, None) == (["1.0", "Z", "latest", "v10", "v2"], False)
    assert tag_page(tags, 2, None) == (["1.0", "Z"], True)
    assert tag_page(tags, 2, "Z") == (["latest", "v10"], True)
    assert tag_page(tags, 2, "v10") == (["v2"], False)
    assert tag_page(tags, 5, None) == (sorted(tags), False)
    assert tag_page(tags, 0, None) == ([], False)
    assert tag_page(tags, None, "latest") == (["v10", "v2"], False)
    assert tag_page(tags, 3, "zzz") == ([], False)


# The spec's fourteen codes and the statuses Docker distribution gives them.
SPEC_CODES = {
    "BLOB_UNKNOWN": 404, "BLOB_UPLOAD_INVALID": 400, "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400, "MANIFEST_BLOB_UNKNOWN": 400, "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404, "NAME_INVALID": 400, "NAME_UNKNOWN": 404, "SIZE_INVALID": 400,
    "UNAUTHORIZED": 401, "DENIED": 403, "UNSUPPORTED": 405, "TOOMANYREQUESTS": 429,
}  # fmt: skip


def test_every_spec_error_code_has_its_status_and_renders() -> None:
    codes = {code.name: code for code in ErrorCode}
    for name, status in SPEC_CODES.items():
        assert codes[name].status == status, name
    for code in ErrorCode:
        assert re.fullmatch(r"[A-Z_]+", code.name)
        assert 400 <= code.status < 600
        body = RegistryError(code, {"x": 1}).to_json()
        assert body == {
            "errors": [{"code": code.name, "message": code.message, "detail": {"x": 1}}]
        }
    # Codes outside the spec are Docker distribution's, for cases the spec has none for.
    assert set(codes) - set(SPEC_CODES) == {
        "TAG_INVALID", "RANGE_INVALID", "PAGINATION_NUMBER_INVALID", "UNKNOWN",
    }  # fmt: skip


class ListedSources(Sources):
    """A source with several named revisions, as versioned sources have."""

    def tags(self) -> list[str]:
        return ["v2", "latest", "v1", "2024-01", "v1"]


def wsgi_get(app, path: str, query: str = "") -> tuple[str, dict[str, str], bytes]:  # type: ignore[no-untyped-def]
    environ: dict = {"PATH_INFO": path, "QUERY_STRING": query, "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    result: dict = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info=None):  # type: ignore[no-untyped-def]
        result["status"], result["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return result["status"], result["headers"], body


def test_tags_route_walks_every_page_by_link(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path)
    sources = ListedSources(SourceConfig("path", str(tmp_path)))
    app = create_app(ImageService(storage, Nix(), sources, BuildSettings()), storage)

    status, headers, body = wsgi_get(app, "/v2/shell/hello/tags/list")
    assert status.startswith("200") and "Link" not in headers
    assert json.loads(body) == {"name": "shell/hello", "tags": ["2024-01", "latest", "v1", "v2"]}

    seen: list[str] = []
    path, query = "/v2/shell/hello/tags/list", "n=3"
    while True:
        status, headers, body = wsgi_get(app, path, query)
        assert status.startswith("200")
        page = json.loads(body)["tags"]
        assert 0 < len(page) <= 3
        seen += page
        if "Link" not in headers:
            break
        match = re.fullmatch(
            r'<(/v2/shell/hello/tags/list)\?(n=3&last=[^>]+)>; rel="next"', headers["Link"]
        )
        assert match, headers["Link"]
        path, query = match.groups()
    assert seen == ["2024-01", "latest", "v1", "v2"]

    status, headers, body = wsgi_get(app, "/v2/shell/hello/tags/list", "n=0")
    assert json.loads(body)["tags"] == [] and "Link" not in headers
    for bad in ("n=-1", "n=x", "n=1e3", "n=" + "9" * 20):
        status, _, body = wsgi_get(app, "/v2/hello/tags/list", bad)
        assert status.startswith("400")
        assert json.loads(body)["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"
    status, _, body = wsgi_get(app, "/v2/hello/tags/list", "last=-x")
    assert status.startswith("400") and json.loads(body)["errors"][0]["code"] == "TAG_INVALID"
    status, _, body = wsgi_get(app, "/v2/Hello/tags/list")
    assert status.startswith("400") and json.loads(body)["errors"][0]["code"] == "NAME_INVALID"
