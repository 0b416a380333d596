"""Image configs, manifests and indexes, and choosing one from `Accept`.

Documents are serialised once, deterministically (fixed key order, compact
separators), and their digests are taken over exactly the bytes served.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from nixery.packages.platforms import Platform

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# OCI 1.1 artifacts: a manifest whose config is the empty JSON object.
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
TITLE = "org.opencontainers.image.title"
CREATED_ANNOTATION = "org.opencontainers.image.created"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
CREATED = "1970-01-01T00:00:01Z"
DEFAULT_PATH = "/bin:/usr/bin:/sbin:/usr/sbin"
CA_FILE = "/etc/ssl/certs/ca-bundle.crt"
REFUSED = re.compile(r"[qQ]\s*=\s*0(\.0{0,3})?")  # an Accept parameter: not acceptable


class Format(Enum):
    """The two manifest dialects; each has a single-image and a list type."""

    OCI = (OCI_MANIFEST, OCI_INDEX, OCI_CONFIG, OCI_LAYER_GZIP)
    DOCKER = (DOCKER_MANIFEST, DOCKER_LIST, DOCKER_CONFIG, DOCKER_LAYER_GZIP)

    @property
    def manifest_type(self) -> str:
        return self.value[0]

    @property
    def index_type(self) -> str:
        return self.value[1]

    @property
    def config_type(self) -> str:
        return self.value[2]

    @property
    def layer_type(self) -> str:
        return self.value[3]


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()  # in this order; none: no field

    def to_json(self, **extra: Any) -> dict[str, Any]:
        out = {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


# What nix-snapshotter (a containerd snapshotter that mounts store paths from
# the node's Nix store) reads on a layer: that it is a Nix layer, and the
# store paths it needs, one numbered key each. containerd hands a snapshotter
# only the annotations under `containerd.io/snapshot/`.
NIX_LAYER_ANNOTATION = "containerd.io/snapshot/nix-layer"
NIX_STORE_PATH_ANNOTATION = "containerd.io/snapshot/nix-store-path."


def nix_layer_annotations(store_paths: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The annotations that mark a layer holding `store_paths` for nix-snapshotter."""
    numbered = [(f"{NIX_STORE_PATH_ANNOTATION}{i}", p) for i, p in enumerate(store_paths)]
    return ((NIX_LAYER_ANNOTATION, "true"), *numbered)


@dataclass(frozen=True)
class Document:
    """A serialised manifest or config, ready to store and serve."""

    media_type: str
    data: bytes

    @functools.cached_property
    def digest(self) -> str:
        # Cached: a kept manifest is served many times (see `images.served`).
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.data))

    @property
    def is_index(self) -> bool:
        """A list of per-platform manifests (OCI index or Docker manifest list)."""
        return self.media_type in INDEX_TYPES


@dataclass(frozen=True)
class Negotiated:
    """What a client accepts, read as a set."""

    formats: tuple[Format, ...]  # manifest dialects accepted, in preference order: OCI first
    index_format: Format | None = None  # the list type to answer with, if any is accepted

    @property
    def index(self) -> bool:
        return self.index_format is not None


def parse_accept(values: Iterable[str]) -> set[str]:
    """All media types named over every Accept header line, without params.

    A type with `q=0` is one the client refuses (RFC 9110), so it is left out.
    """
    types: set[str] = set()
    for value in values:
        for part in value.split(","):
            media, *params = part.split(";")
            media = media.strip().lower()
            if media and not any(REFUSED.fullmatch(p.strip()) for p in params):
                types.add(media)
    return types


def negotiate(accept: Iterable[str]) -> Negotiated:
    """Choose dialects from the set of accepted types; order and non-zero q-values carry no weight.

    A manifest is only answered in a dialect whose manifest type the client
    named, and a list only in a dialect whose list *and* manifest types it
    named, so that every entry of the list is a document the client reads.
    """
    types = parse_accept(accept)
    formats = tuple(f for f in (Format.OCI, Format.DOCKER) if f.manifest_type in types)
    if not formats:
        # No usable preference (no header, */*, schema1 only, or lists without
        # their manifests): a single OCI manifest, which every current client reads.
        return Negotiated((Format.OCI,))
    index_format = next((f for f in formats if f.index_type in types), None)
    return Negotiated(formats, index_format)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def image_config(
    platform: Platform,
    diff_ids: Sequence[str],
    histories: Sequence[str],
    cmd: Sequence[str] | None,
    user: str | None = None,
) -> dict[str, Any]:
    """The image config; `user` ("uid:gid") is who the image runs as, root if None."""
    config: dict[str, Any] = {"Env": [f"PATH={DEFAULT_PATH}", f"SSL_CERT_FILE={CA_FILE}"]}
    if cmd:
        config["Cmd"] = list(cmd)
    if user:
        config["User"] = user
    out: dict[str, Any] = {
        "created": CREATED,
        "architecture": platform.architecture,
        "os": platform.os,
    }
    if platform.variant:
        out["variant"] = platform.variant
    out |= {
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": CREATED, "created_by": h} for h in histories],
    }
    return out


def config_document(config: dict[str, Any], fmt: Format) -> Document:
    return Document(fmt.config_type, canonical_json(config))


def manifest_document(fmt: Format, config: Descriptor, layers: Sequence[Descriptor]) -> Document:
    body = {
        "schemaVersion": 2,
        "mediaType": fmt.manifest_type,
        "config": Descriptor(fmt.config_type, config.digest, config.size).to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    return Document(fmt.manifest_type, canonical_json(body))


def index_document(fmt: Format, manifests: Sequence[tuple[Platform, Descriptor]]) -> Document:
    body = {
        "schemaVersion": 2,
        "mediaType": fmt.index_type,
        "manifests": [d.to_json(platform=p.descriptor()) for p, d in manifests],
    }
    return Document(fmt.index_type, canonical_json(body))


def empty_config() -> Document:
    """The config of every artifact manifest: `{}`, typed as empty."""
    return Document(OCI_EMPTY, EMPTY_JSON)


def artifact_manifest(
    artifact_type: str, blob: Descriptor, title: str, subject: Descriptor
) -> Document:
    """An OCI 1.1 artifact manifest of one file (`blob`, saved as `title`)
    that refers to `subject` (an image manifest)."""
    config = empty_config().descriptor().to_json(data=base64.b64encode(EMPTY_JSON).decode())
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config,
        "layers": [blob.to_json(annotations={TITLE: title})],
        "subject": subject.to_json(),
        "annotations": {CREATED_ANNOTATION: CREATED},
    }
    return Document(OCI_MANIFEST, canonical_json(body))


def referrers_index(artifacts: Sequence[Document]) -> Document:
    """The OCI index listing artifact manifests, as the referrers API answers."""
    entries = []
    for artifact in artifacts:
        body = json.loads(artifact.data)
        extra = {"artifactType": body["artifactType"]}
        if body.get("annotations"):
            extra["annotations"] = body["annotations"]
        entries.append(artifact.descriptor().to_json(**extra))
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return Document(OCI_INDEX, canonical_json(body))


def filter_referrers(index: Document, artifact_type: str) -> Document:
    """`index` (a referrers index) with only the entries of `artifact_type`."""
    body = json.loads(index.data)
    body["manifests"] = [m for m in body["manifests"] if m.get("artifactType") == artifact_type]
    return Document(OCI_INDEX, canonical_json(body))


def media_type_of(data: bytes) -> str | None:
    """The `mediaType` of a stored manifest, or None if it is not one."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    media = value.get("mediaType") if isinstance(value, dict) else None
    return media if media in MANIFEST_TYPES else None


def referenced_digests(data: bytes) -> list[str]:
    """The digests a stored manifest or index points at (config, layers, manifests)."""
    try:
        value = json.loads(data)
    except ValueError:
        return []
    if not isinstance(value, dict):
        return []
    entries = [value.get("config")] + list(value.get("layers") or [])
    entries += list(value.get("manifests") or [])
    return [
        e["digest"] for e in entries if isinstance(e, dict) and isinstance(e.get("digest"), str)
    ]
