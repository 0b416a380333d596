"""Packing throughput: MB/s of uncompressed tar for the reference closure,
next to `tar --sort=name -c PATHS | gzip -6` on the same paths, in one run.

    .venv/bin/python -m benchmarks.pack [--runs N]
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    REFERENCE_IMAGE,
    build_in_process,
    closure,
    machine,
    nix_build,
    table,
)
from nixery.assembly import archive
from nixery.assembly.archive import GZIP, ZSTD, Compression, Output


class HashingSink:
    """Stands in for storage: hashes the compressed bytes, keeps nothing."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Measured:
    wall: float
    cpu: float
    size: int  # uncompressed bytes
    out: int  # compressed bytes
    layers: int = 1

    @property
    def mbs(self) -> float:
        return self.size / self.wall / 1e6

    @property
    def mb_per_cpu(self) -> float:
        return self.size / self.cpu / 1e6

    @property
    def out_ratio(self) -> float:
        return self.out / self.size


def baseline(paths: list[str], tar_size: int) -> Measured:
    """tar | gzip -6, compressed bytes counted and dropped."""
    cpu = children_cpu()
    started = time.perf_counter()
    tar = subprocess.Popen(["tar", "--sort=name", "-cf", "-", *paths],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert tar.stdout is not None
    gz = subprocess.run(["gzip", "-6"], stdin=tar.stdout, capture_output=True, check=True)
    tar.stdout.close()
    if tar.wait() != 0:
        raise RuntimeError("tar failed")
    wall = time.perf_counter() - started
    return Measured(wall, children_cpu() - cpu, tar_size, len(gz.stdout))


def one_layer(paths: list[str], compressions: list[Compression], threaded: bool) -> Measured:
    """All paths as one layer into hashing sinks (no storage)."""
    sinks = [HashingSink() for _ in compressions]
    cpu = time.process_time()
    started = time.perf_counter()
    outputs = [Output(c, s) for c, s in zip(compressions, sinks, strict=True)]
    packed = archive.write_store_layer(paths, outputs, threaded=threaded)
    wall = time.perf_counter() - started
    out = sum(s.size for s in sinks)
    return Measured(wall, time.process_time() - cpu, packed.uncompressed_size, out)


def image_layers(compression: str) -> Measured:
    """The packing phase of a cold build of the reference image: layered, in
    parallel, into real storage (temp file, fsync, rename)."""
    with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
        cpu = time.process_time()
        profile = build_in_process(tmp, compression=compression)
        cpu = time.process_time() - cpu  # also counts the little Python around Nix
        blobs = Path(tmp) / "blobs" / "sha256"
        stored = sum(p.stat().st_size for p in blobs.iterdir())
        layers = len(list((Path(tmp) / "documents" / "layers").iterdir()))
    assert profile is not None
    return Measured(profile.packing, cpu, profile.packed_bytes, stored, layers)


def reference_closure() -> list[str]:
    """The store paths of the reference image (built first if need be)."""
    attrs = [p for p in REFERENCE_IMAGE.split("/") if p != "shell"]
    shell = ["bashInteractive", "coreutils", "moreutils", "nano"]
    return closure(nix_build(*attrs, *shell, "cacert", "iana-etc"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="rounds; each measures every row")
    runs = parser.parse_args().runs

    paths = reference_closure()
    print(f"reference closure: {len(paths)} store paths ({REFERENCE_IMAGE}); {machine()}")
    tar = subprocess.run(["tar", "--sort=name", "-cf", "-", *paths],
                         capture_output=True, check=True).stdout  # fmt: skip
    tar_size = len(tar)

    gzip1 = Compression(GZIP, archive.DEFAULT_COMPRESSION_LEVEL)
    zstd = Compression(ZSTD, archive.DEFAULT_ZSTD_LEVEL)
    cases: list[tuple[str, Callable[[], Measured]]] = [
        ("tar --sort=name | gzip -6 (baseline)", lambda: baseline(paths, tar_size)),
        ("one layer, gzip (ISA-L 1), no threads", lambda: one_layer(paths, [gzip1], False)),
        ("one layer, gzip, encoder thread", lambda: one_layer(paths, [gzip1], True)),
        (
            "one layer, gzip + zstd 3, encoder threads",
            lambda: one_layer(paths, [gzip1, zstd], True),
        ),
        ("cold build: layers in parallel into storage, gzip", lambda: image_layers(GZIP)),
        ("cold build: as above, gzip + zstd", lambda: image_layers(ZSTD)),
    ]
    # Rounds interleave every row with the baseline, so that both see the
    # same load; a row's ratio is its median over rounds.
    measured: list[list[Measured]] = [[] for _ in cases]
    for _ in range(runs):
        for i, (_, fn) in enumerate(cases):
            measured[i].append(fn())
    base = measured[0]
    rows = []
    for (label, _), results in zip(cases, measured, strict=True):
        best = max(results, key=lambda m: m.mbs)
        ratios = [m.mbs / b.mbs for m, b in zip(results, base, strict=True)]
        cpu_ratio = statistics.median(
            m.mb_per_cpu / b.mb_per_cpu for m, b in zip(results, base, strict=True)
        )
        rows.append((label, best.layers, best.mbs, statistics.median(ratios), best.mb_per_cpu,
                     cpu_ratio, best.out_ratio))  # fmt: skip
    table(
        f"Packing throughput (uncompressed tar: {tar_size / 1e6:.1f} MB; {runs} rounds)",
        ["packer", "layers", "best MB/s", "x baseline", "MB per CPU-s", "x baseline (CPU)",
         "out/in"],
        rows,
    )  # fmt: skip
    print("\nTarget: at least 10x the baseline (wall clock). 'x baseline' is the median over")
    print("rounds of each round's ratio; 'MB per CPU-s' counts the CPU time of every thread")
    print("(the baseline's: tar and gzip); for the cold build rows it is the whole build's CPU,")
    print("Nix handling and layering included. 'out/in' of zstd rows counts both stored blobs.")


if __name__ == "__main__":
    main()
