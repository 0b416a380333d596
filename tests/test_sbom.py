"""The bills of materials: schema-valid, one entry per store path, the
closure's edges, reproducible."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from nixery.assembly import sbom
from nixery.assembly.manifest import (
    OCI_MANIFEST,
    Descriptor,
    artifact_manifest,
    canonical_json,
    filter_referrers,
    referrers_index,
)
from nixery.packages.graph import ClosureGraph, StorePath
from nixery.packages.nix import PackageMetadata

S = "/nix/store/"
SUBJECT = Descriptor(OCI_MANIFEST, "sha256:" + "ab" * 32, 1234)


def path(name: str) -> str:
    # A store path's hash part: 32 characters, as Nix makes them.
    return S + hashlib.sha256(name.encode()).hexdigest()[:32] + "-" + name


def closure() -> ClosureGraph:
    """curl and a bash reach glibc; `glibc-2.36-bin` is an output without metadata."""
    edges = {
        "curl-8.0.1": ["libcurl-8.0.1", "glibc-2.36"],
        "libcurl-8.0.1": ["zlib-1.3", "glibc-2.36"],
        "zlib-1.3": ["glibc-2.36"],
        "bash-interactive-5.2": ["glibc-2.36", "glibc-2.36-bin"],
        "glibc-2.36": [],
        "glibc-2.36-bin": ["glibc-2.36"],
    }
    paths = {
        path(n): StorePath(
            path(n),
            1000,
            tuple(sorted(path(r) for r in refs)),
            hashlib.sha256(n.encode()).hexdigest(),
        )
        for n, refs in edges.items()
    }
    return ClosureGraph((path("bash-interactive-5.2"), path("curl-8.0.1")), paths)


METADATA = {
    path("curl-8.0.1"): PackageMetadata(
        path("curl-8.0.1"), "out", "curl", "8.0.1", ("curl",),
        "https://curl.se", "A command line tool for transferring files with URL syntax",
        "https://curl.se/download/curl-8.0.1.tar.xz",
    ),
    path("libcurl-8.0.1"): PackageMetadata(
        path("libcurl-8.0.1"), "out", "libcurl", "8.0.1", ("curl", "MIT"),
    ),
    # Ids SPDX does not know, and a homepage that is no URL, are left out.
    path("zlib-1.3"): PackageMetadata(
        path("zlib-1.3"), "out", "zlib", "1.3", ("Zlib", "not-a-licence"), "not a url",
    ),
    path("glibc-2.36"): PackageMetadata(
        path("glibc-2.36"), "out", "glibc", "2.36", ("LGPL-2.1-or-later",),
    ),
}  # fmt: skip


def documents(graph: ClosureGraph | None = None) -> dict[sbom.SbomFormat, bytes]:
    return sbom.documents("bashInteractive/curl", SUBJECT, graph or closure(), METADATA)


def spdx(tmp_path: Path, data: bytes) -> Any:
    """The document as spdx-tools reads it from a file, with no validation message."""
    file = tmp_path / "sbom.spdx.json"
    file.write_bytes(data)
    document = parse_file(str(file))
    assert validate_full_spdx_document(document, "SPDX-2.3") == []
    return json.loads(data)


def cyclonedx(data: bytes) -> Any:
    """The document, valid against the CycloneDX 1.6 JSON schema (strict)."""
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(data.decode())
    assert error is None, error
    return json.loads(data)


def test_spdx_is_valid_with_one_package_per_store_path(tmp_path: Path) -> None:
    graph = closure()
    body = spdx(tmp_path, documents()[sbom.SPDX])
    assert body["spdxVersion"] == "SPDX-2.3"
    files = Counter(p.get("packageFileName") for p in body["packages"])
    expected: Counter[str | None] = Counter(dict.fromkeys(graph.paths, 1))
    expected[None] = 1  # the image
    assert files == expected
    by_path = {p.get("packageFileName"): p for p in body["packages"]}
    curl = by_path[path("curl-8.0.1")]
    assert (curl["name"], curl["versionInfo"]) == ("curl", "8.0.1")
    assert curl["licenseDeclared"] == "curl"
    assert curl["homepage"] == "https://curl.se"
    assert curl["downloadLocation"] == "https://curl.se/download/curl-8.0.1.tar.xz"
    assert curl["description"].startswith("A command line tool")
    assert curl["checksums"] == [
        {"algorithm": "SHA256", "checksumValue": graph.paths[path("curl-8.0.1")].nar_hash}
    ]
    assert by_path[path("libcurl-8.0.1")]["licenseDeclared"] == "MIT AND curl"
    zlib = by_path[path("zlib-1.3")]
    assert zlib["licenseDeclared"] == "Zlib" and "homepage" not in zlib
    # Without metadata, name and version come from the store path.
    bin_output = by_path[path("glibc-2.36-bin")]
    assert (bin_output["name"], bin_output["versionInfo"]) == ("glibc", "2.36-bin")
    assert bin_output["licenseDeclared"] == "NOASSERTION"


def test_spdx_dependencies_are_the_closure_graph(tmp_path: Path) -> None:
    graph = closure()
    body = spdx(tmp_path, documents()[sbom.SPDX])
    file_of = {p["SPDXID"]: p.get("packageFileName") for p in body["packages"]}
    depends = {
        (file_of[r["spdxElementId"]], file_of[r["relatedSpdxElement"]])
        for r in body["relationships"]
        if r["relationshipType"] == "DEPENDS_ON"
    }
    edges = {(p.path, ref) for p in graph.paths.values() for ref in p.references}
    roots = {(None, root) for root in graph.roots}  # the image depends on the requested ones
    assert depends == edges | roots
    described = [r for r in body["relationships"] if r["relationshipType"] == "DESCRIBES"]
    assert [file_of[r["relatedSpdxElement"]] for r in described] == [None]
    image = next(p for p in body["packages"] if p["SPDXID"] == sbom.IMAGE_SPDX_ID)
    assert image["checksums"][0]["checksumValue"] == SUBJECT.digest.removeprefix("sha256:")
    assert body["documentNamespace"].endswith(SUBJECT.digest)


def test_cyclonedx_is_valid_with_one_component_per_store_path() -> None:
    graph = closure()
    body = cyclonedx(documents()[sbom.CYCLONEDX])
    assert body["specVersion"] == "1.6"
    refs = Counter(c["bom-ref"] for c in body["components"])
    assert refs == Counter(dict.fromkeys(graph.paths, 1))
    by_ref = {c["bom-ref"]: c for c in body["components"]}
    curl = by_ref[path("curl-8.0.1")]
    assert (curl["name"], curl["version"], curl["type"]) == ("curl", "8.0.1", "application")
    assert curl["licenses"] == [{"license": {"id": "curl"}}]
    assert curl["hashes"] == [
        {"alg": "SHA-256", "content": graph.paths[path("curl-8.0.1")].nar_hash}
    ]
    assert {r["type"] for r in curl["externalReferences"]} == {"website", "source-distribution"}
    assert {"name": "nix:store-path", "value": path("curl-8.0.1")} in curl["properties"]
    assert by_ref[path("libcurl-8.0.1")]["licenses"] == [{"expression": "MIT AND curl"}]
    assert by_ref[path("zlib-1.3")]["type"] == "library"


def test_cyclonedx_dependencies_are_the_closure_graph() -> None:
    graph = closure()
    body = cyclonedx(documents()[sbom.CYCLONEDX])
    image = body["metadata"]["component"]
    assert image["type"] == "container" and image["version"] == SUBJECT.digest
    edges = {(d["ref"], on) for d in body["dependencies"] for on in d.get("dependsOn", [])}
    expected = {(p.path, ref) for p in graph.paths.values() for ref in p.references}
    expected |= {(image["bom-ref"], root) for root in graph.roots}
    assert edges == expected


def test_documents_are_reproducible_and_name_their_subject() -> None:
    first, again = documents(), documents()
    assert first == again
    other = sbom.documents(
        "bashInteractive/curl", Descriptor(OCI_MANIFEST, "sha256:" + "cd" * 32, 1), closure(),
        METADATA,
    )  # fmt: skip
    for fmt in sbom.FORMATS:
        assert other[fmt] != first[fmt]  # the namespace and serial follow the subject
    assert json.loads(first[sbom.CYCLONEDX])["metadata"]["timestamp"].startswith("1970-")
    assert json.loads(first[sbom.SPDX])["creationInfo"]["created"] == "1970-01-01T00:00:01Z"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("hello-2.10", ("hello", "2.10")),
        ("bash-interactive-5.2p37", ("bash-interactive", "5.2p37")),
        ("glibc-2.40-66-bin", ("glibc", "2.40-66-bin")),
        ("nixery-root", ("nixery-root", None)),
        ("etc", ("etc", None)),
    ],
)
def test_names_split_as_nix_splits_them(name: str, expected: tuple[str, str | None]) -> None:
    assert sbom.parse_name(name) == expected


def test_artifact_manifests_and_referrers_index() -> None:
    blob = Descriptor(sbom.SPDX_JSON, "sha256:" + "12" * 32, 99)
    artifact = artifact_manifest(sbom.SPDX_JSON, blob, "sbom.spdx.json", SUBJECT)
    body = json.loads(artifact.data)
    assert body["artifactType"] == sbom.SPDX_JSON
    assert body["config"] == {
        "mediaType": "application/vnd.oci.empty.v1+json",
        "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(),
        "size": 2,
        "data": "e30=",
    }
    assert body["subject"] == SUBJECT.to_json()
    assert body["layers"][0]["annotations"] == {"org.opencontainers.image.title": "sbom.spdx.json"}
    other = artifact_manifest(sbom.CYCLONEDX_JSON, blob, "sbom.cdx.json", SUBJECT)
    index = referrers_index([artifact, other])
    entries = json.loads(index.data)["manifests"]
    assert [e["digest"] for e in entries] == [artifact.digest, other.digest]
    assert [e["artifactType"] for e in entries] == [sbom.SPDX_JSON, sbom.CYCLONEDX_JSON]
    only = json.loads(filter_referrers(index, sbom.CYCLONEDX_JSON).data)["manifests"]
    assert [e["digest"] for e in only] == [other.digest]


def test_documents_made_once_per_image_equal_those_made_for_each_manifest() -> None:
    """Both dialects' documents are made from one pair of bodies; patching
    in the subject gives the very bytes made for it from the start."""
    graph = closure()
    listed = sbom.entries(graph, METADATA)
    name = "bashInteractive/curl"
    made = documents()
    assert made[sbom.SPDX] == canonical_json(sbom.spdx_json(name, SUBJECT, graph, listed))
    assert made[sbom.CYCLONEDX] == canonical_json(sbom.cyclonedx_json(name, SUBJECT, graph, listed))
    assert SUBJECT.digest.encode() not in canonical_json(sbom.bodies(name, graph, METADATA).spdx)
