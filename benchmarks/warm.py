"""Warm serving under concurrency: wrk against Nixery and Debian's
`docker-registry` (distribution 2.8) holding the same image (copied with
skopeo), on the same machine: the manifest of the reference image (by tag),
a small blob (about 9 kB) and a layer of a few MB. Optionally another Nixery
source tree too (`--baseline-tree`, e.g. main before a change), so that
before and after are measured in the same run.

Rounds interleave the servers, so that they share the machine's load; the
ratios are medians of per-round ratios.

    .venv/bin/python -m benchmarks.warm [--runs N] [--seconds S] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    OCI,
    REFERENCE_IMAGE,
    machine,
    manifest,
    require,
    table,
)
from benchmarks.pack import reference_closure
from benchmarks.serve import beside_distribution

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT = f"{OCI}, {DOCKER}"
SMALL_BLOB = 9_000  # bytes: the blob nearest this size
LARGE_BLOB = 7_600_000
DISTRIBUTION = "docker-registry (distribution 2.8)"


@dataclass(frozen=True)
class Target:
    label: str
    size: int  # bytes per response, for MB/s; 0 for manifests
    paths: dict[str, str]  # server name -> request path


def nearest(layers: list[dict], size: int) -> dict:
    return min(layers, key=lambda layer: abs(int(layer["size"]) - size))


def wrk(url: str, seconds: float, threads: int, connections: int) -> float:
    """Successful requests per second; a run with errors counts as 0."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "-H",
            f"Accept: {ACCEPT}", url]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if rate is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad is not None:
        print(f"warning: {bad.group(1)} error responses from {url}", file=sys.stderr)
        return 0.0
    return float(rate.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline-tree", type=Path, help="another Nixery source tree")
    parser.add_argument("--runs", type=int, default=5, help="rounds over every server")
    parser.add_argument("--seconds", type=float, default=8, help="wrk duration per measurement")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    args = parser.parse_args()
    require("wrk", "skopeo", "docker-registry")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    reference_closure()  # built before anything is timed
    print(f"reference image: {REFERENCE_IMAGE}; {machine()}")
    image = REFERENCE_IMAGE
    with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
        with beside_distribution(Path(tmp), image, "bench/ref", args.baseline_tree) as (
            new_server,
            registry,
            old_server,
        ):
            new, old = new_server.host, old_server.host
            doc = manifest(new_server, image)
            hosts = {"nixery (this tree)": (new, image)}
            if args.baseline_tree:
                hosts[f"nixery ({args.baseline_tree})"] = (old, image)
            hosts[DISTRIBUTION] = (registry, "bench/ref")
            small, large = nearest(doc["layers"], SMALL_BLOB), nearest(doc["layers"], LARGE_BLOB)
            targets = [
                Target(f"manifest ({len(doc['layers'])} layers, by tag)", 0,
                       {n: f"/v2/{r}/manifests/latest" for n, (_, r) in hosts.items()}),
                Target(f"blob {small['size'] / 1e3:.1f} kB", int(small["size"]),
                       {n: f"/v2/{r}/blobs/{small['digest']}" for n, (_, r) in hosts.items()}),
                Target(f"blob {large['size'] / 1e6:.1f} MB", int(large["size"]),
                       {n: f"/v2/{r}/blobs/{large['digest']}" for n, (_, r) in hosts.items()}),
            ]  # fmt: skip
            rates: dict[tuple[str, str], list[float]] = {
                (t.label, n): [] for t in targets for n in hosts
            }
            for target in targets:  # warm each server and the page cache
                for name, (host, _) in hosts.items():
                    wrk(f"http://{host}{target.paths[name]}", 1, 1, 1)
            for _ in range(args.runs):
                for target in targets:
                    for name, (host, _) in hosts.items():
                        url = f"http://{host}{target.paths[name]}"
                        rates[target.label, name].append(
                            wrk(url, args.seconds, args.threads, args.connections)
                        )
    rows = []
    for target in targets:
        ref = rates[target.label, DISTRIBUTION]
        for name in hosts:
            mine = rates[target.label, name]
            ratio = statistics.median(
                a / b if b else float("nan") for a, b in zip(mine, ref, strict=True)
            )
            mbs = statistics.median(mine) * target.size / 1e6 if target.size else ""
            rows.append((target.label, name, statistics.median(mine), min(mine), max(mine),
                         mbs, ratio))  # fmt: skip
    table(
        f"Warm requests, wrk -t{args.threads} -c{args.connections} -d{args.seconds:g}s, "
        f"median of {args.runs} interleaved rounds",
        ["request", "server", "req/s", "min", "max", "MB/s", "x distribution"],
        rows,
    )
    print("\nTarget: manifests and blobs at least distribution's requests per second.")
    print("'x distribution' is the median of per-round ratios; a round with error")
    print("responses counts as 0 requests per second.")


if __name__ == "__main__":
    main()
