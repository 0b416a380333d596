"""The runtime closure of an image as a graph of store paths."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

STORE_DIR = "/nix/store"


def store_path_name(path: str) -> str:
    """`/nix/store/<hash>-curl-8.0` -> `curl-8.0` (the name popularity uses)."""
    base = path.rsplit("/", 1)[-1]
    return base.split("-", 1)[1] if "-" in base else base


@dataclass(frozen=True)
class StorePath:
    path: str
    nar_size: int
    references: tuple[str, ...]  # never includes `path` itself

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
        paths[path] = StorePath(
            path, int(entry["narSize"]), tuple(sorted(r for r in refs if r != path))
        )
    return paths


def parse_registration(text: str) -> dict[str, StorePath]:
    """Parse `nix-store --dump-db` output (the stable registration format).

    Each entry is: path, NAR hash, NAR size, deriver, reference count, refs.
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
        paths[path] = StorePath(path, nar_size, tuple(sorted(r for r in refs if r != path)))
        i += 5 + count
    return paths
