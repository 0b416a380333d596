"""The artifacts that refer to an image manifest: its bills of materials.

For every image manifest (each dialect, each platform) a build stores one
SBOM per format (`assembly.sbom`) as an OCI 1.1 artifact manifest whose
`subject` is that manifest, and the index of those artifacts twice: as a
blob (so the digest a client saw through the referrers tag stays
fetchable) and as the document `referrers/<hex>.json`, which is how a
subject finds its referrers. The image record names each index, so
garbage collection keeps the artifacts with their image and frees them
with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from nixery.assembly import sbom
from nixery.assembly.manifest import (
    OCI_INDEX,
    Descriptor,
    Document,
    artifact_manifest,
    empty_config,
    referenced_digests,
    referrers_index,
)
from nixery.packages.graph import ClosureGraph
from nixery.packages.nix import PackageMetadata
from nixery.storage import Storage
from nixery.storage.base import validate_digest

PREFIX = "referrers/"


def document_key(subject: str) -> str:
    """Where the referrers index of the manifest `subject` is stored."""
    return f"{PREFIX}{validate_digest(subject)}.json"


def subject_of(key: str) -> str | None:
    """The subject digest of a referrers document key (for gc); None if not one."""
    if not key.startswith(PREFIX) or not key.endswith(".json"):
        return None
    return "sha256:" + key[len(PREFIX) : -len(".json")]


def store_sboms(
    storage: Storage,
    name: str,
    manifests: Mapping[str, Descriptor],
    graph: ClosureGraph,
    metadata: Mapping[str, PackageMetadata],
    bodies: sbom.Bodies | None = None,
) -> dict[str, Descriptor]:
    """Store the SBOMs of every manifest in `manifests` (format name ->
    manifest) with their artifact manifests and referrers indexes; return
    each manifest's referrers index. Blobs come first, the documents that
    point at them last. `bodies`: those of `sbom.bodies`, if already made."""
    storage.put_blob(empty_config().data)
    indexes: dict[str, Document] = {}
    if bodies is None:
        bodies = sbom.bodies(name, graph, metadata)
    for fmt_name, subject in manifests.items():
        artifacts = []
        for fmt, data in bodies.documents(subject).items():
            blob = Descriptor(fmt.media_type, storage.put_blob(data), len(data))
            artifact = artifact_manifest(fmt.media_type, blob, fmt.filename, subject)
            storage.put_blob(artifact.data)
            artifacts.append(artifact)
        index = referrers_index(artifacts)
        storage.put_blob(index.data)
        indexes[fmt_name] = index
    for fmt_name, index in indexes.items():
        storage.put_document(document_key(manifests[fmt_name].digest), index.data)
    return {k: index.descriptor() for k, index in indexes.items()}


def stored_index(storage: Storage, subject: str) -> Document | None:
    """The referrers index of the manifest `subject`, if any was stored."""
    data = storage.get_document(document_key(subject))
    return Document(OCI_INDEX, data) if data is not None else None


def artifact_blobs(storage: Storage, index: Descriptor) -> set[str]:
    """Every blob a referrers index needs: itself, its artifact manifests,
    their config and files."""
    digests = {index.digest}
    for artifact in referenced_digests(storage.read_blob(index.digest) or b""):
        digests.add(artifact)
        digests.update(referenced_digests(storage.read_blob(artifact) or b""))
    return digests


def sbom_files(storage: Storage, index: Descriptor) -> list[tuple[str, Descriptor]]:
    """(file name, blob) of each SBOM listed by a referrers index."""
    files = []
    for artifact in referenced_digests(storage.read_blob(index.digest) or b""):
        body = json.loads(storage.read_blob(artifact) or b"{}")
        for layer in body.get("layers") or []:
            title = (layer.get("annotations") or {}).get("org.opencontainers.image.title", "")
            blob = Descriptor(layer["mediaType"], layer["digest"], layer["size"])
            files.append((title, blob))
    return files
