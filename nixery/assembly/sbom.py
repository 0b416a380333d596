"""Software bills of materials of an image, from its closure graph.

One entry per store path of the closure (name, version, store path, NAR
hash, and the licence, homepage, description and source URL where the
package set knows them), the closure's references as dependency edges, and
the image as the root that depends on the requested packages. Written as
SPDX 2.3 JSON (`spdx-tools`) and CycloneDX 1.6 JSON (`cyclonedx-python-lib`).

Documents are reproducible: the same image gives the same bytes. Nothing in
them depends on time; the SPDX namespace and the CycloneDX serial number
are derived from the digest of the image manifest they describe.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cyclonedx.model import (
    ExternalReference,
    ExternalReferenceType,
    HashAlgorithm,
    HashType,
    Property,
    XsUri,
)
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.dependency import Dependency
from cyclonedx.model.license import DisjunctiveLicense, License, LicenseExpression
from cyclonedx.output.json import JsonV1Dot6
from spdx_tools.common.spdx_licensing import spdx_licensing
from spdx_tools.spdx.jsonschema.document_converter import DocumentConverter
from spdx_tools.spdx.model import (
    Actor,
    ActorType,
    Checksum,
    ChecksumAlgorithm,
    CreationInfo,
    Document,
    Package,
    PackagePurpose,
    Relationship,
    RelationshipType,
    SpdxNoAssertion,
)
from spdx_tools.spdx.validation.uri_validators import validate_download_location, validate_url

from nixery import __version__
from nixery.assembly.manifest import CREATED, OCI_MANIFEST, Descriptor, canonical_json
from nixery.packages.graph import ClosureGraph, StorePath
from nixery.packages.nix import PackageMetadata

SPDX_JSON = "application/spdx+json"
CYCLONEDX_JSON = "application/vnd.cyclonedx+json"
# The image configs' creation time: fixed, so documents are reproducible.
CREATED_AT = dt.datetime.fromisoformat(CREATED.replace("Z", "+00:00"))
TOOL = f"nixery-{__version__}"
IMAGE_SPDX_ID = "SPDXRef-Image"
IMAGE_REF = "image"
NAMESPACE = "urn:nixery:sbom:"
# The CycloneDX property naming a component's store path (and output).
STORE_PATH_PROPERTY = "nix:store-path"
OUTPUT_PROPERTY = "nix:output"
# The subject documents are made for before they are made for each manifest.
PLACEHOLDER = Descriptor(OCI_MANIFEST, "sha256:" + "0" * 64, 0)


@dataclass(frozen=True)
class SbomFormat:
    """One bill-of-materials format: its media type (the artifact type of
    its referrer) and the file name clients save it under."""

    name: str
    media_type: str
    filename: str


SPDX = SbomFormat("spdx", SPDX_JSON, "sbom.spdx.json")
CYCLONEDX = SbomFormat("cyclonedx", CYCLONEDX_JSON, "sbom.cdx.json")
FORMATS = (SPDX, CYCLONEDX)


@dataclass(frozen=True)
class Entry:
    """A store path as the bill of materials lists it."""

    path: StorePath
    name: str
    version: str | None
    output: str | None
    licenses: str | None  # an SPDX license expression
    homepage: str | None
    description: str | None
    source: str | None

    @property
    def spdx_id(self) -> str:
        return f"SPDXRef-Nix-{self.path.hash_part}"


def parse_name(store_name: str) -> tuple[str, str | None]:
    """`curl-8.0-bin` -> (`curl`, `8.0-bin`), as Nix's `parseDrvName` splits:
    the version starts after the first dash that a non-letter follows."""
    for i, c in enumerate(store_name[:-1]):
        if c == "-" and not store_name[i + 1].isalpha():
            return store_name[:i], store_name[i + 1 :]
    return store_name, None


@functools.lru_cache(maxsize=4096)
def _known_licence(spdx_id: str) -> bool:
    return not spdx_licensing.validate(spdx_id).errors


def license_expression(ids: Sequence[str]) -> str | None:
    """The SPDX ids that SPDX knows, as one expression (a package under
    several licences is under all of them as far as anyone can tell)."""
    known = sorted({i for i in ids if _known_licence(i)})
    return " AND ".join(known) if known else None


def _url(value: str | None) -> str | None:
    return value if value and not validate_url(value) else None


def _download(value: str | None) -> str | None:
    return value if value and not validate_download_location(value) else None


def entries(graph: ClosureGraph, metadata: Mapping[str, PackageMetadata]) -> list[Entry]:
    """One entry per store path of `graph`, in store path order."""
    out = []
    for path in sorted(graph.paths):
        store_path = graph.paths[path]
        meta = metadata.get(path, PackageMetadata(path))
        parsed_name, parsed_version = parse_name(store_path.name)
        out.append(
            Entry(
                store_path,
                meta.name or parsed_name,
                meta.version or parsed_version,
                meta.output,
                license_expression(meta.licenses),
                _url(meta.homepage),
                meta.description,
                _download(meta.source),
            )
        )
    return out


def spdx_json(
    name: str, subject: Descriptor, graph: ClosureGraph, listed: Sequence[Entry]
) -> dict[str, Any]:
    """The SPDX 2.3 JSON document of the image whose manifest is `subject`."""
    info = CreationInfo(
        spdx_version="SPDX-2.3",
        spdx_id="SPDXRef-DOCUMENT",
        name=name,
        document_namespace=_namespace(subject),
        creators=[Actor(ActorType.TOOL, TOOL)],
        created=CREATED_AT.replace(tzinfo=None),  # spdx-tools writes it as UTC
    )
    image = Package(
        spdx_id=IMAGE_SPDX_ID,
        name=name,
        version=subject.digest,
        download_location=SpdxNoAssertion(),
        files_analyzed=False,
        checksums=[Checksum(ChecksumAlgorithm.SHA256, _hex(subject))],
        primary_package_purpose=PackagePurpose.CONTAINER,
        comment=_image_comment(subject),
    )
    packages = [image] + [_spdx_package(e, e.path.path in graph.roots) for e in listed]
    ids = {e.path.path: e.spdx_id for e in listed}
    relationships = [Relationship("SPDXRef-DOCUMENT", RelationshipType.DESCRIBES, IMAGE_SPDX_ID)]
    relationships += [
        Relationship(IMAGE_SPDX_ID, RelationshipType.CONTAINS, e.spdx_id) for e in listed
    ]
    relationships += [
        Relationship(IMAGE_SPDX_ID, RelationshipType.DEPENDS_ON, ids[root])
        for root in sorted(graph.roots)
    ]
    relationships += [
        Relationship(e.spdx_id, RelationshipType.DEPENDS_ON, ids[ref])
        for e in listed
        for ref in e.path.references
    ]
    document = Document(info, packages=packages, relationships=relationships)
    converted: dict[str, Any] = DocumentConverter().convert(document)
    return converted


def _spdx_for(body: dict[str, Any], subject: Descriptor) -> bytes:
    """`body` (made for `PLACEHOLDER`) made for `subject`."""
    body = copy.deepcopy(body)
    body["documentNamespace"] = _namespace(subject)
    image = next(p for p in body["packages"] if p["SPDXID"] == IMAGE_SPDX_ID)
    image.update(
        versionInfo=subject.digest,
        checksums=[{"algorithm": "SHA256", "checksumValue": _hex(subject)}],
        comment=_image_comment(subject),
    )
    return canonical_json(body)


def _spdx_package(entry: Entry, root: bool) -> Package:
    licence = spdx_licensing.parse(entry.licenses) if entry.licenses else SpdxNoAssertion()
    comment = f"Nix output {entry.output!r}" if entry.output else None
    return Package(
        spdx_id=entry.spdx_id,
        name=entry.name,
        version=entry.version,
        file_name=entry.path.path,
        download_location=entry.source or SpdxNoAssertion(),
        files_analyzed=False,
        checksums=_spdx_checksums(entry.path),
        homepage=entry.homepage,
        license_concluded=SpdxNoAssertion(),
        license_declared=licence,
        copyright_text=SpdxNoAssertion(),
        description=entry.description,
        comment=comment,
        primary_package_purpose=PackagePurpose.APPLICATION if root else PackagePurpose.LIBRARY,
    )


def _spdx_checksums(path: StorePath) -> list[Checksum]:
    return [Checksum(ChecksumAlgorithm.SHA256, path.nar_hash)] if path.nar_hash else []


def cyclonedx_json(
    name: str, subject: Descriptor, graph: ClosureGraph, listed: Sequence[Entry]
) -> dict[str, Any]:
    """The CycloneDX 1.6 JSON document of the image whose manifest is `subject`."""
    bom = Bom(serial_number=_serial(subject))
    bom.metadata.timestamp = CREATED_AT
    image = Component(
        type=ComponentType.CONTAINER,
        name=name,
        version=subject.digest,
        bom_ref=IMAGE_REF,
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=_hex(subject))],
    )
    bom.metadata.component = image
    components = {e.path.path: _component(e, e.path.path in graph.roots) for e in listed}
    for component in components.values():
        bom.components.add(component)
    # Built directly: `Bom.register_dependency` searches every registration each time.
    edges = [(image, [components[root] for root in sorted(graph.roots)])]
    edges += [
        (components[e.path.path], [components[ref] for ref in e.path.references]) for e in listed
    ]
    bom.dependencies.update(
        Dependency(ref=c.bom_ref, dependencies=[Dependency(ref=d.bom_ref) for d in on])
        for c, on in edges
    )
    converted: dict[str, Any] = json.loads(JsonV1Dot6(bom).output_as_string())
    return converted


def _cyclonedx_for(body: dict[str, Any], subject: Descriptor) -> bytes:
    """`body` (made for `PLACEHOLDER`) made for `subject`."""
    body = copy.deepcopy(body)
    body["serialNumber"] = _serial(subject).urn
    body["metadata"]["component"].update(
        version=subject.digest, hashes=[{"alg": "SHA-256", "content": _hex(subject)}]
    )
    # Re-serialised compactly: the library indents or pads its output.
    return canonical_json(body)


def _hex(subject: Descriptor) -> str:
    return subject.digest.removeprefix("sha256:")


def _namespace(subject: Descriptor) -> str:
    return f"{NAMESPACE}spdx:{subject.digest}"


def _serial(subject: Descriptor) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{NAMESPACE}{subject.digest}")


def _image_comment(subject: Descriptor) -> str:
    return f"The image manifest {subject.digest} ({subject.media_type})"


def _component(entry: Entry, root: bool) -> Component:
    references = []
    if entry.homepage:
        references.append(
            ExternalReference(type=ExternalReferenceType.WEBSITE, url=XsUri(entry.homepage))
        )
    if entry.source:
        references.append(
            ExternalReference(
                type=ExternalReferenceType.SOURCE_DISTRIBUTION, url=XsUri(entry.source)
            )
        )
    properties = [Property(name=STORE_PATH_PROPERTY, value=entry.path.path)]
    if entry.output:
        properties.append(Property(name=OUTPUT_PROPERTY, value=entry.output))
    hashes = [HashType(alg=HashAlgorithm.SHA_256, content=entry.path.nar_hash)]
    return Component(
        type=ComponentType.APPLICATION if root else ComponentType.LIBRARY,
        name=entry.name,
        version=entry.version,
        bom_ref=entry.path.path,
        description=entry.description,
        hashes=hashes if entry.path.nar_hash else [],
        licenses=_cyclonedx_licenses(entry.licenses),
        external_references=references,
        properties=properties,
    )


def _cyclonedx_licenses(expression: str | None) -> Iterable[License]:
    if not expression:
        return []
    if " " in expression:
        return [LicenseExpression(expression)]
    return [DisjunctiveLicense(id=expression)]


@dataclass(frozen=True)
class Bodies:
    """Both documents of an image, made once for `PLACEHOLDER`: the
    manifests of an image (two dialects) differ only in the fields that
    name their subject, and building a document is most of the cost."""

    spdx: dict[str, Any]
    cyclonedx: dict[str, Any]

    def documents(self, subject: Descriptor) -> dict[SbomFormat, bytes]:
        """Every format's document for the image whose manifest is `subject`."""
        return {
            SPDX: _spdx_for(self.spdx, subject),
            CYCLONEDX: _cyclonedx_for(self.cyclonedx, subject),
        }


def bodies(name: str, graph: ClosureGraph, metadata: Mapping[str, PackageMetadata]) -> Bodies:
    listed = entries(graph, metadata)
    return Bodies(
        spdx_json(name, PLACEHOLDER, graph, listed),
        cyclonedx_json(name, PLACEHOLDER, graph, listed),
    )


def documents(
    name: str,
    subject: Descriptor,
    graph: ClosureGraph,
    metadata: Mapping[str, PackageMetadata],
) -> dict[SbomFormat, bytes]:
    """Every format's document for the image whose manifest is `subject`."""
    return bodies(name, graph, metadata).documents(subject)
