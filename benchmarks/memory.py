"""Peak RSS of the server while it builds an image whose closure is over
1 GB (`bigdata1g`, 1100 MiB of incompressible data, from
`overlays/bigdata-1g.nix`), next to the same server idle and building a
small image, measured in one run. Each row is a fresh server, so the peak
(VmHWM) belongs to that build alone.

    .venv/bin/python -m benchmarks.memory
"""

from __future__ import annotations

import subprocess

from benchmarks.common import OVERLAYS, machine, manifest, nix_build, nixery, table

OVERLAY = OVERLAYS / "bigdata-1g.nix"


SHELL = ["bashInteractive", "coreutils", "moreutils", "nano"]


def closure_mb(image: str) -> float:
    attrs = [a for p in image.split("/") for a in (SHELL if p == "shell" else [p])]
    outs = nix_build(*attrs, "cacert", "iana-etc", overlays=[OVERLAY])
    argv = ["nix-store", "--query", "--size", *_requisites(outs)]
    sizes = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()
    return sum(int(s) for s in sizes) / 1e6


def _requisites(outs: list[str]) -> list[str]:
    argv = ["nix-store", "--query", "--requisites", *outs]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()


def peak(image: str | None, *args: str) -> tuple[float, float]:
    """(peak RSS MiB, layer bytes stored in MB) of a fresh server building `image`."""
    with nixery("--overlay", str(OVERLAY), *args) as server:
        if image is None:
            return server.peak_rss_mib(), 0.0
        manifest(server, image)
        stored = sum(p.stat().st_size for p in (server.storage / "blobs" / "sha256").iterdir())
        return server.peak_rss_mib(), stored / 1e6


def main() -> None:
    print(machine())
    small, big = "shell/hello", "bigdata1g"
    sizes = {image: closure_mb(image) for image in (small, big)}  # builds them first
    idle, _ = peak(None)
    rows: list[tuple[object, ...]] = [("idle server, after /v2/ (baseline)", "", "", idle, 1.0, "")]
    for image, args in [(small, ()), (big, ()), (big, ("--compression", "zstd"))]:
        rss, stored = peak(image, *args)
        label = f"build {image}" + (" with --compression zstd" if args else "")
        rows.append((label, sizes[image], stored, rss, rss / idle, rss - idle))
    table(
        "Server peak RSS (VmHWM) while building",
        ["scenario", "closure MB", "blobs stored MB", "peak RSS MiB", "x idle",
         "MiB above idle"],
        rows,
    )  # fmt: skip
    print("\nTarget: under 200 MiB peak for the >= 1 GB image.")


if __name__ == "__main__":
    main()
