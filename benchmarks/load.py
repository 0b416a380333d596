"""Load: many concurrent clients pulling cached images from one server.

Each client keeps one connection open and pulls again and again, as a
registry client does once it knows an image's digest: the manifest by
digest, then the config and every layer (read to the end). Clients are
threads spread over a few processes, so the client side is not held back
by one interpreter. Only 127.0.0.1, bounded in time. One client alone is
the baseline; the table gives the latency ratios to it.

    .venv/bin/python -m benchmarks.load [--clients 200] [--duration 60]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_PKGS = ROOT / "tests" / "fixtures" / "pkgs"
OCI = "application/vnd.oci.image.manifest.v1+json"
IMAGES = ("hello", "jq", "shell/curl")

os.environ.setdefault("NIX_CONFIG", "substituters =\nextra-platforms = aarch64-linux")


@dataclass(frozen=True)
class Image:
    name: str
    manifest: str
    blobs: tuple[str, ...]


@dataclass
class Result:
    requests: list[float] = field(default_factory=list)  # seconds each
    pulls: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bytes: int = 0

    def merge(self, other: Result) -> None:
        self.requests += other.requests
        self.pulls += other.pulls
        self.errors += other.errors
        self.bytes += other.bytes


# -- one client -----------------------------------------------------------------------


def _get(conn: http.client.HTTPConnection, path: str, accept: str | None) -> int:
    conn.request("GET", path, headers={"Accept": accept} if accept else {})
    resp = conn.getresponse()
    size = 0
    while chunk := resp.read(1 << 16):
        size += len(chunk)
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: {resp.status}")
    return size


def pull(conn: http.client.HTTPConnection, image: Image, result: Result) -> None:
    started = time.monotonic()
    paths: list[tuple[str, str | None]] = [(f"/v2/{image.name}/manifests/{image.manifest}", OCI)]
    paths += [(f"/v2/{image.name}/blobs/{blob}", None) for blob in image.blobs]
    for path, accept in paths:
        t = time.monotonic()
        result.bytes += _get(conn, path, accept)
        result.requests.append(time.monotonic() - t)
    result.pulls.append(time.monotonic() - started)


def client(host: str, images: Sequence[Image], deadline: float, pulls: int, offset: int) -> Result:
    """Pull round-robin until `deadline` (monotonic) or `pulls` pulls, whichever is first."""
    result = Result()
    conn = http.client.HTTPConnection(host, timeout=120)
    done = 0
    while time.monotonic() < deadline and (pulls <= 0 or done < pulls):
        image = images[(offset + done) % len(images)]
        try:
            pull(conn, image, result)
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            result.errors.append(f"{image.name}: {exc}")
            conn.close()
            conn = http.client.HTTPConnection(host, timeout=120)
        done += 1
    conn.close()
    return result


def _process(host: str, images: Sequence[Image], threads: int, seconds: float, pulls: int,
             first: int) -> Result:  # fmt: skip
    deadline = time.monotonic() + seconds
    results = [Result() for _ in range(threads)]

    def run(i: int) -> None:
        results[i] = client(host, images, deadline, pulls, first + i)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    total = Result()
    for r in results:
        total.merge(r)
    return total


def run_load(
    host: str,
    images: Sequence[Image],
    clients: int,
    seconds: float = 3600,
    pulls: int = 0,
    processes: int | None = None,
) -> Result:
    """`clients` concurrent clients for `seconds`, or `pulls` pulls each if given."""
    processes = max(1, min(processes or (os.cpu_count() or 1) * 2, clients))
    shares = [
        clients // processes + (1 if i < clients % processes else 0) for i in range(processes)
    ]
    firsts = [sum(shares[:i]) for i in range(processes)]
    total = Result()
    with ProcessPoolExecutor(processes) as pool:
        futures = [pool.submit(_process, host, images, n, seconds, pulls, f)
                   for n, f in zip(shares, firsts, strict=True)]  # fmt: skip
        for future in futures:
            total.merge(future.result())
    return total


def discover(host: str, names: Sequence[str]) -> list[Image]:
    """Build (or find cached) images by tag and note what a pull fetches."""
    images = []
    for name in names:
        req = urllib.request.Request(
            f"http://{host}/v2/{name}/manifests/latest", headers={"Accept": OCI}
        )
        with urllib.request.urlopen(req, timeout=900) as resp:
            digest = resp.headers["Docker-Content-Digest"]
            manifest = json.load(resp)
        blobs = [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]
        images.append(Image(name, digest, tuple(blobs)))
    return images


# -- the benchmark ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(*args: str, storage: Path | None = None) -> Iterator[str]:
    """A real `nixery serve` on 127.0.0.1; yields host:port."""
    with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
        port = free_port()
        argv = [sys.executable, "-m", "nixery", "serve", "--host", "127.0.0.1", "--port",
                str(port), "--storage-path", str(storage or Path(tmp) / "storage"),
                "--pkgs-path", str(FIXTURE_PKGS), *args]  # fmt: skip
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/v2/")
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()


def wait_http(url: str, timeout: float = 30) -> float:
    started = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return time.monotonic() - started
        except urllib.error.HTTPError:
            return time.monotonic() - started
        except OSError:
            if time.monotonic() - started > timeout:
                raise
            time.sleep(0.01)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    cells = [[str(c) for c in header]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def machine() -> str:
    return f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.2f} at start"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60, help="seconds per scenario")
    parser.add_argument("--images", default=",".join(IMAGES))
    args = parser.parse_args()
    print(machine())
    with server() as host:
        images = discover(host, args.images.split(","))
        sizes = {i.name: len(i.blobs) for i in images}
        print(f"images (blobs per pull): {sizes}")
        rows = []
        base = None
        for clients in (1, args.clients):
            started = time.monotonic()
            result = run_load(host, images, clients, seconds=args.duration)
            elapsed = time.monotonic() - started
            p50 = percentile(result.requests, 0.5) * 1000
            base = base or p50
            rows.append((
                clients, len(result.pulls), len(result.requests),
                len(result.requests) / elapsed, result.bytes / elapsed / (1 << 20),
                p50, percentile(result.requests, 0.99) * 1000,
                percentile(result.pulls, 0.5) * 1000, percentile(result.pulls, 0.99) * 1000,
                len(result.errors), p50 / base,
            ))  # fmt: skip
            if result.errors:
                print(f"{len(result.errors)} errors, e.g. {result.errors[:3]}")
    table(
        f"Pulls of cached images by digest, {args.duration:g} s per row (latencies in ms)",
        ["clients", "pulls", "requests", "req/s", "MiB/s", "req p50", "req p99",
         "pull p50", "pull p99", "errors", "req p50 x 1 client"],
        rows,
    )  # fmt: skip
    print("\nTarget: zero errors at every concurrency.")
    print(f"median request latency, all rows: {statistics.median([r[5] for r in rows]):.3g} ms")


if __name__ == "__main__":
    main()
