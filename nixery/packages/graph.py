"""The runtime closure of an image as a graph of store paths."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

STORE_DIR = "/nix/store"
# Nix's base-32 alphabet (no e, o, u, t), used by newer Nix for NAR hashes.
NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


def store_path_name(path: str) -> str:
    """`/nix/store/<hash>-curl-8.0` -> `curl-8.0` (the name popularity uses)."""
    base = path.rsplit("/", 1)[-1]
    return base.split("-", 1)[1] if "-" in base else base


@dataclass(frozen=True)
class StorePath:
    path: str
    nar_size: int
    references: tuple[str, ...]  # never includes `path` itself
    nar_hash: str = ""  # SHA-256 of the path's NAR serialisation, lowercase hex

    @property
    def hash_part(self) -> str:
        """`/nix/store/<hash>-curl-8.0` -> `<hash>`: unique within a store."""
        return self.path.rsplit("/", 1)[-1].split("-", 1)[0]

    @property
    def name(self) -> str:
        return store_path_name(self.path)


@dataclass(frozen=True)
class ClosureGraph:
    """Every store path an image needs; `roots` are the requested packages."""

    roots: tuple[str, ...]
    paths: Mapping[str, StorePath] = field(hash=False)

    def __post_init__(self) -> None:
        missing = [r for r in self.roots if r not in self.paths]
        missing += [
            ref for p in self.paths.values() for ref in p.references if ref not in self.paths
        ]
        if missing:
            raise ValueError(f"closure is not closed: {sorted(set(missing))[:5]}")

    def total_size(self, paths: Iterable[str] | None = None) -> int:
        selected = self.paths.keys() if paths is None else paths
        return sum(self.paths[p].nar_size for p in selected)


def parse_path_info(text: str) -> dict[str, StorePath]:
    """Parse `nix path-info --json` output: a list of entries with a `path`
    (Nix up to 2.18), or an object keyed by path (later versions)."""
    data = json.loads(text)
    entries = data.items() if isinstance(data, dict) else ((e["path"], e) for e in data)
    paths: dict[str, StorePath] = {}
    for path, entry in entries:
        refs = entry.get("references") or []
        references = tuple(sorted(r for r in refs if r != path))
        nar_hash = sha256_hex(entry["narHash"]) if entry.get("narHash") else ""
        paths[path] = StorePath(path, int(entry["narSize"]), references, nar_hash)
    return paths


def parse_registration(text: str) -> dict[str, StorePath]:
    """Parse `nix-store --dump-db` output (the stable registration format).

    Each entry is: path, NAR hash, NAR size, deriver, reference count, refs.
    The NAR hash is base-16 (Nix 2.8) or `sha256:` and base-32 (newer Nix).
    """
    lines = text.splitlines()
    paths: dict[str, StorePath] = {}
    i = 0
    while i < len(lines):
        if not lines[i]:
            i += 1
            continue
        path, nar_size, count = lines[i], int(lines[i + 2]), int(lines[i + 4])
        refs = lines[i + 5 : i + 5 + count]
        references = tuple(sorted(r for r in refs if r != path))
        paths[path] = StorePath(path, nar_size, references, sha256_hex(lines[i + 1]))
        i += 5 + count
    return paths


def sha256_hex(nar_hash: str) -> str:
    """A SHA-256 NAR hash as lowercase hex, whichever way Nix wrote it."""
    value = nar_hash.strip()
    if value.startswith("sha256-"):  # SRI, as `nix path-info --json` writes it since 2.19
        return base64.b64decode(value.removeprefix("sha256-"), validate=True).hex()
    value = value.removeprefix("sha256:")
    if len(value) == 64:
        return value.lower()
    if len(value) != 52 or any(c not in NIX32 for c in value):
        raise ValueError(f"not a SHA-256 NAR hash: {nar_hash[:80]!r}")
    # Nix's base-32 lists the digest's bits from the last 5-bit group to the first.
    number = 0
    for c in value:
        number = number * 32 + NIX32.index(c)
    return number.to_bytes(32, "little").hex()
