"""Availability under slow and abusive clients: probe latency while one
address attacks, for this tree's Nixery, another tree's Nixery (before the
connection limits; `--baseline-tree`, e.g. a worktree of main) and Debian's
`docker-registry` (distribution 2.8) holding the same image.

Each attack runs for `--seconds` from 127.0.0.3 while a well-behaved client
on 127.0.0.2 sends `GET /v2/` on a new connection every 0.25 s:

- trickle: 150 connections sending a header line every 2 s, reconnecting;
- stall: 150 connections that stop after the first header line, reconnecting;
- no-read: 100 connections that ask for a 64 MB blob and never read, reconnecting;
- idle: 2,000 kept-alive connections (from 127.0.0.10-13) after one request each.

Then the 64 MB blob's download throughput with curl, rounds interleaving
the servers.

    .venv/bin/python -m benchmarks.availability [--baseline-tree /work/main] [--seconds 20]
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from benchmarks.common import machine, manifest, require, table
from benchmarks.serve import beside_distribution, curl
from tests.attack import Prober, SlowClients, connect_from

IMAGE = "bigdata"  # 64 MB of incompressible data in the fixture package set
HEAD = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"


Attack = Callable[[], AbstractContextManager[object]]


def probe_during(host: str, seconds: float, attack: Attack) -> list[float | None]:
    with attack():
        time.sleep(1)  # let the attack build up
        with Prober(host) as prober:
            time.sleep(seconds)
    return prober.latencies


@contextmanager
def idle_flood(host: str, count: int = 2000) -> Iterator[None]:
    sockets: list[socket.socket] = []
    try:
        for n in range(count):
            sock = connect_from(f"127.0.0.{10 + n // 500}", host, timeout=30)
            sockets.append(sock)
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in sockets:
            sock.recv(4096)
        yield
    finally:
        for sock in sockets:
            sock.close()


def attacks(host: str, blob_path: str) -> dict[str, Attack]:
    request = f"GET {blob_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    return {
        "trickle (150 conns, a header line / 2 s)": lambda: SlowClients(
            host, 150, HEAD, drip=b"X-Slow: 1\r\n", interval=2.0, reconnects=20_000
        ),
        "stall (150 conns, first line only)": lambda: SlowClients(
            host, 150, HEAD, reconnects=20_000
        ),
        "no-read (100 conns, 64 MB blob)": lambda: SlowClients(
            host, 100, request, reads=False, reconnects=20_000
        ),
        "idle (2,000 kept-alive conns)": lambda: idle_flood(host),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline-tree", type=Path, help="another Nixery source tree")
    parser.add_argument("--seconds", type=float, default=20, help="probing time per attack")
    parser.add_argument("--runs", type=int, default=10, help="throughput rounds")
    args = parser.parse_args()
    require("curl", "skopeo", "docker-registry")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    print(machine())
    with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
        with beside_distribution(Path(tmp), IMAGE, f"bench/{IMAGE}", args.baseline_tree) as (
            new_server,
            registry,
            old_server,
        ):
            new, old = new_server.host, old_server.host
            layer = max(manifest(new_server, IMAGE)["layers"], key=lambda layer: layer["size"])
            digest, size = layer["digest"], int(layer["size"])
            servers = {"nixery (this tree)": (new, f"/v2/{IMAGE}/blobs/{digest}")}
            if args.baseline_tree:
                servers[f"nixery ({args.baseline_tree})"] = (old, f"/v2/{IMAGE}/blobs/{digest}")
            servers["docker-registry (distribution 2.8)"] = (
                registry, f"/v2/bench/{IMAGE}/blobs/{digest}",
            )  # fmt: skip
            rows = []
            for attack in attacks("", ""):
                for name, (host, path) in servers.items():
                    latencies = probe_during(host, args.seconds, attacks(host, path)[attack])
                    answered = [t for t in latencies if t is not None]
                    rows.append((
                        attack, name, len(latencies), len(latencies) - len(answered),
                        percentile(answered, 0.5) * 1000 if answered else "-",
                        percentile(answered, 0.99) * 1000 if answered else "-",
                        max(answered) * 1000 if answered else "-",
                    ))  # fmt: skip
                    time.sleep(3)  # let the server drop what the attack left
            table(
                f"Probe latency (GET /v2/ from another address, every 0.25 s for "
                f"{args.seconds:.0f} s) during each attack from one address",
                ["attack", "server", "probes", "unanswered", "p50 ms", "p99 ms", "max ms"],
                rows,
            )
            speeds: dict[str, list[float]] = {name: [] for name in servers}
            for host, path in servers.values():
                curl(f"http://{host}{path}")  # warm
            for _ in range(args.runs):
                for name, (host, path) in servers.items():
                    speeds[name].append(curl(f"http://{host}{path}"))
            first = next(iter(servers))
            table(
                f"Blob download, {size / 1e6:.0f} MB, curl to /dev/null ({args.runs} rounds)",
                ["server", "median MB/s", "best MB/s", f"x {first}"],
                [(name, statistics.median(s), max(s),
                  statistics.median(a / b for a, b in zip(s, speeds[first], strict=True)))
                 for name, s in speeds.items()],
            )  # fmt: skip
    print("\nTarget: probes p99 < 500 ms under every attack; throughput unchanged.")


if __name__ == "__main__":
    main()
