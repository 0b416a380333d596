"""What the bills of materials cost a cold build.

1. The evaluation that resolves the image's names, with and without the
   metadata walk (`resolve_with_metadata` vs `resolve`), in interleaved
   rounds: wall seconds and Nix's own CPU seconds (`NIX_SHOW_STATS`). On
   the fixture set by default; `--nixpkgs DIR` evaluates a nixpkgs tree
   (nothing is built), e.g. the 24.11 tree of the evaluation-only tests.
2. A cold build of the reference image: the `sbom` share of its profile
   (writing and storing four SBOMs) against the whole build.

    .venv/bin/python -m benchmarks.sbom [--runs N] [--nixpkgs DIR] [--packages a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import FIXTURE_PKGS, REFERENCE_IMAGE, build_in_process, machine, table
from nixery.packages.names import parse_image_name
from nixery.packages.nix import Nix
from nixery.packages.sources import NixSource


def evaluate(source: NixSource, packages: list[str], metadata: bool) -> tuple[float, float, int]:
    """(wall seconds, Nix CPU seconds, metadata entries) of one evaluation."""
    with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
        stats = Path(tmp) / "stats.json"
        env = {**os.environ, "NIX_SHOW_STATS": "1", "NIX_SHOW_STATS_PATH": str(stats)}
        nix = Nix(timeout=600, env=env)
        started = time.perf_counter()
        if metadata:
            entries = len(nix.resolve_with_metadata(source, "x86_64-linux", packages).metadata)
        else:
            nix.resolve(source, "x86_64-linux", packages)
            entries = 0
        wall = time.perf_counter() - started
        cpu = float(json.loads(stats.read_text())["cpuTime"])
    return wall, cpu, entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="rounds; medians are shown")
    parser.add_argument("--nixpkgs", help="a nixpkgs tree to evaluate instead of the fixture")
    parser.add_argument("--packages", help="comma-separated names (default: the reference image)")
    args = parser.parse_args()
    print(f"reference image: {REFERENCE_IMAGE}; {machine()}")
    source = NixSource("path", args.nixpkgs or str(FIXTURE_PKGS))
    images = (
        [[p] for p in args.packages.split(",")]
        if args.packages
        else [list(parse_image_name(REFERENCE_IMAGE).packages)]
    )
    med = statistics.median
    rows: list[tuple[object, ...]] = []
    for packages in images:
        plain: list[tuple[float, float, int]] = []
        walked: list[tuple[float, float, int]] = []
        for _ in range(args.runs):
            plain.append(evaluate(source, packages, False))
            walked.append(evaluate(source, packages, True))
        rows.append((
            " ".join(packages)[:40], walked[0][2],
            med([p[0] for p in plain]), med([w[0] for w in walked]),
            med([w[0] / p[0] for p, w in zip(plain, walked, strict=True)]),
            med([p[1] for p in plain]), med([w[1] for w in walked]),
            med([w[1] / p[1] for p, w in zip(plain, walked, strict=True)]),
        ))  # fmt: skip
    table(
        f"Resolving names with the metadata walk vs without (median of {args.runs})",
        ["packages", "metadata entries", "wall s", "wall s with", "ratio",
         "Nix CPU s", "Nix CPU s with", "ratio"],
        rows,
    )  # fmt: skip

    shares = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
            profile = build_in_process(tmp)
            assert profile is not None
            shares.append((profile.sbom, profile.total, profile.metadata_entries))
    table(
        f"SBOMs in a cold build of the reference image (median of {args.runs})",
        ["metadata entries", "sbom s", "build s", "sbom share"],
        [
            (
                shares[0][2],
                med([s[0] for s in shares]),
                med([s[1] for s in shares]),
                med([s[0] / s[1] for s in shares]),
            )
        ],  # fmt: skip
    )


if __name__ == "__main__":
    main()
