"""Concurrent pulls of uncached images, with skopeo, against fresh servers.

1. 32 clients pull one uncached image at once: how many builds run (must be
   1) and the total time, next to one client pulling it alone.
2. 8 different uncached images pulled at once, next to the same 8 pulled one
   after another.

Every scenario starts a server with empty storage; the packages are already
in the Nix store, so the time is the registry's.

    .venv/bin/python -m benchmarks.concurrency
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import REFERENCE_IMAGE, Server, machine, nix_build, nixery, require, table

IMAGES = ["shell/hello", "curl", "git", "jq", "python3", "sqlite/less", "wget", "file/strace"]


def skopeo_pull(server: Server, image: str, dest: Path) -> None:
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{server.host}/{image}",
         f"dir:{dest}"],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip


def builds(server: Server) -> int:
    return len(re.findall(r"nixery\.images: build started ", server.log_text()))


@dataclass(frozen=True)
class Result:
    seconds: float
    builds: int
    peak_rss: float  # MiB, server
    server_cpu: float  # seconds, the server and its Nix children
    client_cpu: float  # seconds, every skopeo


def cpu_of(pid: int) -> float:
    """CPU seconds of a process and its waited-for children (Nix)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pulls(images: Sequence[str], parallel: bool, *args: str) -> Result:
    """Pull `images` from a fresh server started with `args`."""
    with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp, nixery(*args) as server:
        dests = [Path(tmp) / f"pull-{i}" for i in range(len(images))]
        server_cpu, client_cpu = cpu_of(server.process.pid), children_cpu()
        started = time.perf_counter()
        if parallel:
            with ThreadPoolExecutor(len(images)) as pool:
                list(pool.map(lambda a: skopeo_pull(server, *a), zip(images, dests, strict=True)))
        else:
            for image, dest in zip(images, dests, strict=True):
                skopeo_pull(server, image, dest)
        seconds = time.perf_counter() - started
        return Result(
            seconds,
            builds(server),
            server.peak_rss_mib(),
            cpu_of(server.process.pid) - server_cpu,
            children_cpu() - client_cpu,
        )


def main() -> None:
    require("skopeo")
    names = {p for image in [REFERENCE_IMAGE, *IMAGES] for p in image.split("/")} - {"shell"}
    nix_build(*sorted(names), "bashInteractive", "coreutils", "moreutils", "nano")
    print(machine())

    scenarios = [
        ("1 client pulls the reference image (baseline)", [REFERENCE_IMAGE], False, None),
        ("32 clients pull it at once", [REFERENCE_IMAGE] * 32, True, 0),
        ("8 different images, one after another (baseline)", IMAGES, False, None),
        ("8 different images at once", IMAGES, True, 2),
        ("8 different images at once, --max-builds 8", IMAGES, True, 2),
    ]
    results: list[Result] = []
    rows = []
    for label, images, parallel, base in scenarios:
        r = pulls(images, parallel, *(["--max-builds", "8"] if "max-builds" in label else []))
        results.append(r)
        ratio = r.seconds / results[base].seconds if base is not None else 1.0
        rows.append((label, r.seconds, r.builds, ratio, r.server_cpu, r.client_cpu, r.peak_rss))
    table(
        "Concurrent pulls of uncached images (skopeo copy to dir:, fresh storage each)",
        ["scenario", "seconds", "builds", "x baseline time", "server CPU s", "skopeo CPU s",
         "server peak RSS MiB"],
        rows,
    )  # fmt: skip
    print(f"\nreference image: {REFERENCE_IMAGE}; 8 images: {', '.join(IMAGES)}")
    print("Target: 32 concurrent pulls of one image run exactly 1 build.")


if __name__ == "__main__":
    main()
