"""The images' data model: build settings, the stored records of images and
layers, build profiles, and the keys records are stored under.

A record is stored under a key computed from everything that decides its
bytes, `FORMAT_VERSION` included, so a changed input or format never finds
an old record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from nixery.assembly import archive
from nixery.assembly.archive import Compression
from nixery.assembly.layers import DEFAULT_BUDGET
from nixery.assembly.manifest import OCI_LAYER_ZSTD, Descriptor, Format
from nixery.packages.platforms import Platform, host_cores, host_platform

# Bump when the bytes of layers or manifests change for the same input.
FORMAT_VERSION = "3"
DEFAULT_MAX_QUEUE = 16
# Requests that may wait for builds at once: each holds a server thread.
DEFAULT_MAX_WAITING = 48
DEFAULT_LEASE_TTL = 30.0


@dataclass(frozen=True)
class BuildSettings:
    layer_budget: int = DEFAULT_BUDGET
    compression_level: int = archive.DEFAULT_COMPRESSION_LEVEL
    platforms: tuple[Platform, ...] = field(default_factory=lambda: (host_platform(),))
    overlays: tuple[str, ...] = ()
    max_packages: int = 64
    max_image_size: int | None = None  # closure NAR bytes
    # "gzip", or "zstd": OCI manifests then reference zstd layers, Docker
    # manifests gzip ones (Docker schema2 has no zstd); both share diff_ids.
    compression: str = archive.GZIP
    zstd_level: int = archive.DEFAULT_ZSTD_LEVEL
    # Layers packed at once: twice the cores, so that a worker waiting for
    # fsync leaves its core to another.
    pack_workers: int = field(default_factory=lambda: 2 * host_cores())
    max_builds: int = field(default_factory=host_cores)  # images built at once
    max_queue: int = DEFAULT_MAX_QUEUE  # more images waiting for a build slot
    max_waiting: int = DEFAULT_MAX_WAITING  # requests waiting for builds at once
    # Annotate OCI manifests' store layers for nix-snapshotter (same layers).
    nix_snapshotter: bool = False
    # Seconds a replica's build or layer lease outlives its last renewal.
    lease_ttl: float = DEFAULT_LEASE_TTL

    def outputs(self) -> tuple[Compression, ...]:
        """The encodings every layer is stored in; gzip always comes first."""
        gzip = Compression(archive.GZIP, self.compression_level)
        if self.compression == archive.ZSTD:
            return (gzip, Compression(archive.ZSTD, self.zstd_level))
        return (gzip,)

    def manifest_variant(self) -> list[str]:
        """What, beyond the layers, decides the manifests (part of image keys).
        Empty by default, so the keys of plain images stay what they were."""
        return ["nix-snapshotter"] if self.nix_snapshotter else []

    def encoding(self) -> list[Any]:
        """What, beyond the input, decides the bytes of layers (part of cache keys)."""
        return [[c.codec, c.level] for c in self.outputs()]


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@dataclass(frozen=True)
class Layer:
    digest: str  # the gzip blob, which every client can read
    size: int
    diff_id: str
    paths: tuple[str, ...]
    zstd: Blob | None = None  # the same tar, zstd-compressed

    def descriptor(self, fmt: Format) -> Descriptor:
        if self.zstd is not None and fmt is Format.OCI:
            return Descriptor(OCI_LAYER_ZSTD, self.zstd.digest, self.zstd.size)
        return Descriptor(fmt.layer_type, self.digest, self.size)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "digest": self.digest,
            "size": self.size,
            "diff_id": self.diff_id,
            "paths": list(self.paths),
        }
        if self.zstd is not None:
            out["zstd"] = asdict(self.zstd)
        return out

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Layer:
        zstd = Blob(data["zstd"]["digest"], data["zstd"]["size"]) if "zstd" in data else None
        return Layer(data["digest"], data["size"], data["diff_id"], tuple(data["paths"]), zstd)


@dataclass(frozen=True)
class BuiltImage:
    """One platform's image: its manifests in both formats, its layers, and
    for each manifest the index of its referrers (its bills of materials)."""

    manifests: Mapping[str, Descriptor]  # Format name -> manifest descriptor
    layers: tuple[Layer, ...]
    packages: tuple[str, ...]
    referrers: Mapping[str, Descriptor] = field(default_factory=dict)  # Format name -> index

    def to_json(self) -> dict[str, Any]:
        return {
            "manifests": {k: d.to_json() for k, d in self.manifests.items()},
            "layers": [layer.to_json() for layer in self.layers],
            "packages": list(self.packages),
            "referrers": {k: d.to_json() for k, d in self.referrers.items()},
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> BuiltImage:
        manifests = {
            k: Descriptor(d["mediaType"], d["digest"], d["size"])
            for k, d in data["manifests"].items()
        }
        layers = tuple(Layer.from_json(layer) for layer in data["layers"])
        referrers = {
            k: Descriptor(d["mediaType"], d["digest"], d["size"])
            for k, d in (data.get("referrers") or {}).items()
        }
        return BuiltImage(manifests, layers, tuple(data["packages"]), referrers)


@dataclass(frozen=True)
class BuildProfile:
    """Where a build's time went, in seconds of wall-clock time, and what it packed.

    `store_io` is the time spent inside storage writes and commits while
    packing, summed over the packing threads (so it can exceed `packing`,
    which includes it)."""

    evaluate: float = 0.0  # resolving the names in the package set
    realise: float = 0.0  # building or substituting the packages
    closure: float = 0.0  # reading the closure graph and grouping layers
    packing: float = 0.0  # packing and storing every layer
    store_io: float = 0.0
    documents: float = 0.0  # configs, manifests and the image record
    sbom: float = 0.0  # writing and storing the bills of materials (part of `documents`)
    total: float = 0.0
    packed_bytes: int = 0  # uncompressed tar bytes of the layers packed
    # Outputs whose metadata `evaluate` read for the bills of materials (the
    # evaluation's share of their cost grows with it).
    metadata_entries: int = 0

    @property
    def nix(self) -> float:
        return self.evaluate + self.realise + self.closure

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_json(data: Mapping[str, float]) -> BuildProfile:
        seconds = {f: float(data.get(f, 0.0)) for f in _PROFILE_SECONDS}
        return BuildProfile(
            **seconds,
            packed_bytes=int(data.get("packed_bytes", 0)),
            metadata_entries=int(data.get("metadata_entries", 0)),
        )


_PROFILE_SECONDS = (
    "evaluate", "realise", "closure", "packing", "store_io", "documents", "sbom", "total",
)  # fmt: skip


def cache_key(*parts: Any) -> str:
    """The storage key of a record made from `parts` (JSON values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
