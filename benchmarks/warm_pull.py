"""Warm pulls against cold builds, for each kind of package source.

For every source the real server is started on 127.0.0.1 with an empty
store and the same image is requested: the first request builds it (cold),
then 1,000 manifest requests on one keep-alive connection are answered from
the stored image without Nix (warm). Cold builds are repeated with a fresh
store and the median is reported; the Nix store keeps the packages' outputs
between runs, so "cold" is the registry's own work (evaluation, closure,
layer packing), the cheapest a rebuild can be.

    .venv/bin/python benchmarks/warm_pull.py [--requests 1000] [--image shell/hello]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NIX_CONFIG", "substituters =\nextra-platforms = aarch64-linux")

from tests.conftest import free_port, wait_for  # noqa: E402
from tests.sourcefixtures import (  # noqa: E402
    channel_server,
    copy_package_set,
    make_pkgs_repo,
    tarball,
)

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
COLD_RUNS = 3
WARMUP = 20


@dataclass(frozen=True)
class Row:
    source: str
    cold: float  # seconds, median
    p50: float  # seconds
    p99: float
    worst: float


@contextmanager
def server(args: list[str], work: Path) -> Iterator[str]:
    port = free_port()
    storage = tempfile.mkdtemp(dir=work, prefix="storage-")
    argv = [sys.executable, "-m", "nixery", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--storage-path", storage, "--log-level", "warning",
            "--source-cache", str(work / "source-cache"), *args]  # fmt: skip
    with open(work / "server.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/v2/")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def get(conn: http.client.HTTPConnection, path: str) -> float:
    started = time.perf_counter()
    conn.request("GET", path, headers=ACCEPT)
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise SystemExit(f"GET {path}: HTTP {response.status}")
    return elapsed


def measure(name: str, args: list[str], path: str, requests: int, work: Path) -> Row:
    colds: list[float] = []
    warm: list[float] = []
    for run in range(COLD_RUNS):
        with server(args, work) as host:
            conn = http.client.HTTPConnection(host, timeout=600)
            colds.append(get(conn, path))
            if run == COLD_RUNS - 1:
                for _ in range(WARMUP):
                    get(conn, path)
                warm = [get(conn, path) for _ in range(requests)]
            conn.close()
    warm.sort()
    p99 = warm[min(len(warm) - 1, int(len(warm) * 0.99))]
    return Row(name, statistics.median(colds), statistics.median(warm), p99, warm[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--image", default="shell/hello")
    opts = parser.parse_args()

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp, channel_server() as channels:
        work = Path(tmp)
        pkgs = copy_package_set(work / "pkgs")
        repo = make_pkgs_repo(work / "repo")
        commit = hashlib.sha1(b"bench").hexdigest()
        channels.tarballs[commit] = tarball(pkgs, f"nixpkgs-{commit}")
        channels.revisions["nixos-bench"] = commit
        channel = ["--channel", "nixos-bench", "--channel-url", channels.tarball_url,
                   "--channel-revision-url", channels.revision_url]  # fmt: skip
        cases = [
            ("local path", ["--pkgs-path", str(pkgs)], "latest"),
            ("local path, TTL 0", ["--pkgs-path", str(pkgs), "--channel-ttl", "0"], "latest"),
            ("git tag", ["--pkgs-repo", repo.url], "v1"),
            ("git branch", ["--pkgs-repo", repo.url], "latest"),
            ("channel name", channel, "latest"),
            ("flake (git)", ["--flake", f"git+{repo.url}"], "v1"),
        ]
        for name, args, tag in cases:
            path = f"/v2/{opts.image}/manifests/{tag}"
            rows.append(measure(name, args, path, opts.requests, work))
            print(f"measured {name}", file=sys.stderr)

    print(f"\nimage {opts.image}: cold build = median of {COLD_RUNS} builds into an empty store;")
    print(f"warm = {opts.requests} manifest GETs on one keep-alive connection\n")
    header = (
        f"{'source':<20} {'cold build':>11} {'warm p50':>9} {'warm p99':>9} "
        f"{'warm max':>9} {'cold/p50':>9}  target"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r.cold / r.p50
        ok = "met" if r.p50 < 0.005 and ratio >= 100 else "MISSED"
        print(
            f"{r.source:<20} {r.cold * 1000:>8.0f} ms {r.p50 * 1000:>6.2f} ms "
            f"{r.p99 * 1000:>6.2f} ms {r.worst * 1000:>6.2f} ms {ratio:>8.0f}x  {ok}"
        )
    print("\ntarget: warm p50 < 5 ms and at least 100x faster than the cold build")


if __name__ == "__main__":
    main()
