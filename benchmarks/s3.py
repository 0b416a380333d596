"""S3 backend vs filesystem storage, measured side by side in one run.

    .venv/bin/python -m benchmarks.s3 [--rounds 3] [--image shell/curl/git/python3]

Starts a throwaway Ceph RGW (tests/s3server.py) and Nixery servers on
127.0.0.1, then measures:

1. pulls of a reference image with skopeo: cold (empty storage: pack and
   store every layer) and warm (everything stored), filesystem vs S3 with
   presigned redirects vs S3 streamed through Nixery (`--s3-redirect off`);
2. pack-and-store throughput of a large layer (64 MiB of incompressible
   data) and of a compressible one (the python3 closure), and raw blob
   upload throughput with 1, 2 and 4 parts in flight.

The Nix store is warmed first, so cold pulls measure packing and storing,
not building. The S3 server shares the machine's cores with Nixery and the
client; numbers are medians of `--rounds` interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from nixery.assembly import archive
from nixery.packages import process
from nixery.storage import FilesystemStorage, Storage
from nixery.storage.s3 import MIB, S3Storage
from tests import s3server
from tests.conftest import FIXTURE_PKGS, free_port, wait_for

os.environ.setdefault("NIX_CONFIG", "substituters =\nextra-platforms = aarch64-linux")


@contextmanager
def nixery(storage_args: list[str], env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "nixery", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--pkgs-path", str(FIXTURE_PKGS), "--log-level", "warning", *storage_args]  # fmt: skip
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/v2/", timeout=30)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def skopeo_pull(host: str, image: str) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-oci-") as tmp:
        argv = ["skopeo", "copy", "-q", "--src-tls-verify=false",
                f"docker://{host}/{image}", f"oci:{tmp}/oci:latest"]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=600)
        return time.perf_counter() - started


def pull_times(server: s3server.S3Server, image: str, rounds: int) -> dict[str, list[float]]:
    bucket = server.new_bucket("bench")
    s3_common = ["--storage-backend", "s3", "--s3-bucket", bucket,
                 "--s3-endpoint", server.endpoint, "--s3-path-style"]  # fmt: skip
    results: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)

    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench-fs-") as tmp:
            with nixery(["--storage-path", tmp], {}) as host:
                record("filesystem cold", skopeo_pull(host, image))
                record("filesystem warm", skopeo_pull(host, image))
        prefix = ["--s3-prefix", uuid.uuid4().hex]
        with nixery(s3_common + prefix, server.env) as host:
            record("s3 redirect cold", skopeo_pull(host, image))
            record("s3 redirect warm", skopeo_pull(host, image))
        with nixery(s3_common + prefix + ["--s3-redirect", "off"], server.env) as host:
            record("s3 proxied warm", skopeo_pull(host, image))
    return results


def store_path(attr: str) -> str:
    argv = ["nix-build", "--no-out-link", str(FIXTURE_PKGS), "-A", attr]
    return process.run(argv, timeout=600).stdout.strip()


def closure(path: str) -> list[str]:
    return process.run(["nix-store", "--query", "--requisites", path]).stdout.split()


def timed_pack(storage: Storage, paths: list[str]) -> tuple[float, float, int]:
    """Seconds to pack and write, seconds to commit, compressed bytes."""
    with storage.blob_writer() as writer:
        started = time.perf_counter()
        archive.write_store_layer(paths, [archive.Output(archive.GZIP_DEFAULT, writer)])
        packed = time.perf_counter()
        writer.commit()
        return packed - started, time.perf_counter() - packed, writer.size


def timed_raw(storage: Storage, total: int) -> tuple[float, float, int]:
    rng = random.Random(total)
    data = [rng.randbytes(MIB) for _ in range(16)]
    with storage.blob_writer() as writer:
        started = time.perf_counter()
        for i in range(total // MIB):
            chunk = data[i % 16]
            writer.write(bytes([i % 256]) + chunk[1:])
        written = time.perf_counter()
        writer.commit()
        return written - started, time.perf_counter() - written, writer.size


def s3_storage(server: s3server.S3Server, bucket: str, inflight: int) -> Callable[[], Storage]:
    def make() -> Storage:
        return S3Storage(
            bucket, prefix=uuid.uuid4().hex, endpoint_url=server.endpoint, path_style=True,
            parts_in_flight=inflight,
        )  # fmt: skip

    return make


def throughput(server: s3server.S3Server, rounds: int) -> list[tuple[str, str, float, float, int]]:
    os.environ.update(server.env)
    bucket = server.new_bucket("bench")
    big = [store_path("bigdata")]
    python = closure(store_path("python3"))
    rows: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-fs-") as tmp:
        backends: list[tuple[str, Callable[[], Storage]]] = [
            ("filesystem", lambda: FilesystemStorage(Path(tmp) / uuid.uuid4().hex)),
        ]
        for n in (1, 2, 4):
            backends.append((f"s3, {n} part(s) in flight", s3_storage(server, bucket, n)))
        for _ in range(rounds):
            for name, make in backends:
                storage = make()
                rows.setdefault(("bigdata layer (incompressible)", name), []).append(
                    timed_pack(storage, big)
                )
                rows.setdefault(("python3 closure layer", name), []).append(
                    timed_pack(storage, python)
                )
                rows.setdefault(("raw bytes, 256 MiB", name), []).append(
                    timed_raw(storage, 256 * MIB)
                )
    out = []
    for (what, name), samples in rows.items():
        write = statistics.median(s[0] for s in samples)
        commit = statistics.median(s[1] for s in samples)
        out.append((what, name, write, commit, samples[0][2]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", default="shell/curl/git/python3")
    args = parser.parse_args()
    print(f"# {os.cpu_count()} cores; warming the Nix store", flush=True)
    store_path("bigdata")
    store_path("python3")
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        server = s3server.start(Path(tmp))
        try:
            pulls = pull_times(server, args.image, args.rounds)
            packs = throughput(server, args.rounds)
        finally:
            server.stop()

    print(f"\n## Pull of {args.image} with skopeo (median of {args.rounds})\n")
    print("| storage | cold s | warm s |")
    print("|---|---:|---:|")
    med = {k: statistics.median(v) for k, v in pulls.items()}
    print(f"| filesystem | {med['filesystem cold']:.2f} | {med['filesystem warm']:.2f} |")
    print(f"| s3, 307 to presigned URL | {med['s3 redirect cold']:.2f} "
          f"| {med['s3 redirect warm']:.2f} |")  # fmt: skip
    print(f"| s3, streamed through Nixery | | {med['s3 proxied warm']:.2f} |")
    print(f"| ratio s3 redirect / filesystem | "
          f"{med['s3 redirect cold'] / med['filesystem cold']:.2f} "
          f"| {med['s3 redirect warm'] / med['filesystem warm']:.2f} |")  # fmt: skip
    print(f"| ratio s3 streamed / filesystem | "
          f"| {med['s3 proxied warm'] / med['filesystem warm']:.2f} |")  # fmt: skip

    print(f"\n## Pack and store one layer (median of {args.rounds})\n")
    print("| layer | storage | size MiB | write s | commit s | MiB/s | throughput vs filesystem |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base = {what: write + commit for what, name, write, commit, _ in packs if name == "filesystem"}
    for what, name, write, commit, size in packs:
        total = write + commit
        print(f"| {what} | {name} | {size / MIB:.1f} | {write:.2f} | {commit:.2f} "
              f"| {size / MIB / total:.0f} | {base[what] / total:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
