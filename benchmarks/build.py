"""A cold build of the reference image, split into Nix, packing and storing,
from the profile every build reports (`BuildProfile`, in the build record).

"Cold" means an empty Nixery storage; the packages are already in the Nix
store (as with a warm binary cache), so Nix time is evaluation and queries.
The baseline is what a naive registry would do for the same image: the same
Nix steps, then `tar --sort=name -c CLOSURE | gzip -6`, measured in the same
run.

    .venv/bin/python -m benchmarks.build [--runs N] [--large]

`--large` builds `LARGE_IMAGE` instead (over 100 MB in 35 layers);
`--baseline-tree DIR` also times a cold build with another Nixery source
tree (e.g. main before a change) in each round, in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    FIXTURE_PKGS,
    LARGE_IMAGE,
    LARGE_OVERLAY,
    REFERENCE_IMAGE,
    build_in_process,
    closure,
    machine,
    nix_build,
    table,
)
from benchmarks.pack import baseline, reference_closure
from nixery.images.model import BuildProfile

IMAGE = REFERENCE_IMAGE
OVERLAYS: tuple[Path, ...] = ()


def build(storage_dir: str, compression: str) -> tuple[BuildProfile | None, float]:
    """The build's profile (None if the image was stored) and the request's seconds."""
    started = time.perf_counter()
    profile = build_in_process(storage_dir, IMAGE, compression, OVERLAYS)
    return profile, time.perf_counter() - started


# Run with another tree's `nixery` first on sys.path: one cold build, its profile as JSON.
OTHER_TREE_BUILD = """
import json, sys
from nixery.assembly.manifest import negotiate
from nixery.images.model import BuildSettings
from nixery.images.service import ImageService
from nixery.packages.nix import Nix
from nixery.packages.sources import SourceConfig, Sources
from nixery.storage import FilesystemStorage
from benchmarks.common import OCI, Recorder
storage, image, pkgs, overlays = sys.argv[1], sys.argv[2], sys.argv[3], tuple(sys.argv[4:])
recorder, nix = Recorder(), Nix(timeout=600)
service = ImageService(FilesystemStorage(storage), nix,
                       Sources(SourceConfig("path", pkgs), nix, overlays),
                       BuildSettings(overlays=overlays), events=recorder)
service.manifest(image, "latest", negotiate([OCI]))
print(json.dumps(recorder.profiles[0].to_json()))
"""


def build_with_tree(tree: Path, storage_dir: str) -> BuildProfile:
    """A cold gzip build of IMAGE by the Nixery in `tree`, in a child process."""
    argv = [sys.executable, "-c", OTHER_TREE_BUILD, storage_dir, IMAGE, str(FIXTURE_PKGS),
            *map(str, OVERLAYS)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, check=True)
    return BuildProfile.from_json(json.loads(out.stdout.splitlines()[-1]))


def large_closure() -> list[str]:
    extra = nix_build("vimfiles", "perlfiles", "cmakefiles", overlays=[LARGE_OVERLAY])
    return sorted(set(reference_closure()) | set(closure(extra)))


def forget_images(storage_dir: str) -> None:
    """Drop the stored image records, keeping every layer."""
    shutil.rmtree(Path(storage_dir) / "documents" / "images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are shown")
    parser.add_argument("--large", action="store_true", help="the image of over 100 MB")
    parser.add_argument("--baseline-tree", type=Path, help="another Nixery source tree")
    args = parser.parse_args()
    runs = args.runs
    global IMAGE, OVERLAYS
    if args.large:
        IMAGE, OVERLAYS = LARGE_IMAGE, (LARGE_OVERLAY,)
    print(f"image: {IMAGE}; {machine()}")

    cold, zstd, relayer = "cold, gzip", "cold, gzip + zstd", "image not stored, layers stored"
    results: dict[str, list[BuildProfile]] = {cold: [], zstd: [], relayer: []}
    other = f"cold, gzip, {args.baseline_tree}"
    if args.baseline_tree:
        results[other] = []
    stored: list[float] = []  # the image is stored: no build at all
    naive: list[float] = []
    tar_gzip: list[float] = []  # tar | gzip -6 alone
    paths = large_closure() if args.large else reference_closure()
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
            results[cold].append(_profile(build(tmp, "gzip")))
            stored.append(build(tmp, "gzip")[1])
            forget_images(tmp)
            results[relayer].append(_profile(build(tmp, "gzip")))
        with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
            results[zstd].append(_profile(build(tmp, "zstd")))
        if args.baseline_tree:
            with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
                results[other].append(build_with_tree(args.baseline_tree, tmp))
        tar_gzip.append(baseline(paths, 0).wall)
        naive.append(results[cold][-1].nix + tar_gzip[-1])

    med = statistics.median
    rows: list[tuple[object, ...]] = []
    for label, t in results.items():
        rows.append((
            label, med([x.evaluate for x in t]), med([x.realise for x in t]),
            med([x.closure for x in t]), med([x.packing for x in t]),
            med([x.store_io for x in t]), med([x.documents for x in t]),
            med([x.total for x in t]),
            med([n / x.total for n, x in zip(naive, t, strict=True)]),
            med([n / x.total for n, x in zip(tar_gzip, t, strict=True)]),
            f"{t[0].packed_bytes / 1e6:.1f}",
        ))  # fmt: skip
    speedup = med([n / s for n, s in zip(naive, stored, strict=True)])
    rows.append(("image stored: no build", "", "", "", "", "", "", med(stored), speedup,
                 med([n / s for n, s in zip(tar_gzip, stored, strict=True)]), ""))  # fmt: skip
    rows.append(("baseline: same Nix + tar | gzip -6", "", "", "", "", "", "", med(naive), 1.0,
                 "", ""))  # fmt: skip
    rows.append(("tar --sort=name | gzip -6 alone", "", "", "", "", "", "", med(tar_gzip), "",
                 1.0, ""))  # fmt: skip
    table(
        f"Cold build of {'the large' if args.large else 'the reference'} image "
        f"({len(paths)} store paths; seconds, median of {runs} interleaved rounds)",
        ["build", "Nix eval", "Nix realise", "closure + layering", "packing", "(storage I/O)",
         "documents", "total", "x faster than baseline", "x tar | gzip -6", "MB packed"],
        rows,
    )  # fmt: skip
    print("\n'packing' is wall time of packing every layer in parallel, storage writes")
    print("included; '(storage I/O)' is the time inside storage writes, fsync and rename,")
    print("summed over packing threads. Nix: evaluation, realise (already built), and")
    print("the closure query; the baseline reuses those Nix times.")


def _profile(result: tuple[BuildProfile | None, float]) -> BuildProfile:
    if result[0] is None:
        raise RuntimeError("expected a build")
    return result[0]


if __name__ == "__main__":
    main()
