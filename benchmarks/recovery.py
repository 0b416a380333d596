"""Recovery costs: starting over a crashed server's storage, and verifying blobs.

1. Seconds from `nixery serve` until `/v2/` answers, with a clean storage
   (baseline) and with the temp files of many dead writers to remove.
2. The first download of a layer after a restart (hashed against its digest
   before it is served) next to the second (already verified), and the
   hashing rate.

    .venv/bin/python -m benchmarks.recovery [--dead-writers 1000] [--runs 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.load import (
    FIXTURE_PKGS,
    OCI,
    free_port,
    machine,
    server,
    table,
    wait_http,
)


def plant_dead_writers(storage: Path, writers: int, files_each: int) -> None:
    """What `writers` killed servers leave: a lock (free) and half-written files each."""
    tmp = storage / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    # (Any run before has removed the previous ones.)
    for i in range(writers):
        name = f"crashed-{i}"
        (tmp / f"{name}.lock").write_bytes(b"")
        (tmp / name).mkdir()
        for j in range(files_each):
            (tmp / name / f"blob-{j}").write_bytes(b"x" * 4096)


def start_time(storage: Path) -> tuple[float, float]:
    """Seconds until /v2/ answers, and until the dead writers' files are gone."""
    port = free_port()
    argv = [sys.executable, "-m", "nixery", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--storage-path", str(storage), "--pkgs-path", str(FIXTURE_PKGS)]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/")
        ready = time.monotonic() - started
        while any(p.name.startswith("crashed-") for p in (storage / "tmp").iterdir()):
            time.sleep(0.05)
        return ready, time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(30)


def download(host: str, name: str, digest: str) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://{host}/v2/{name}/blobs/{digest}", timeout=600) as resp:
        while resp.read(1 << 20):
            pass
    return time.monotonic() - started


def largest_layer(host: str, name: str) -> tuple[str, int]:
    req = urllib.request.Request(
        f"http://{host}/v2/{name}/manifests/latest", headers={"Accept": OCI}
    )
    with urllib.request.urlopen(req, timeout=900) as resp:
        layers = json.load(resp)["layers"]
    layer = max(layers, key=lambda entry: entry["size"])
    return layer["digest"], layer["size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dead-writers", type=int, default=1000)
    parser.add_argument("--files-each", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="bigdata")
    args = parser.parse_args()
    print(machine())

    with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
        clean, crashed = Path(tmp) / "clean", Path(tmp) / "crashed"
        times: dict[Path, list[float]] = {clean: [], crashed: []}
        cleaned: list[float] = []
        for _ in range(args.runs):
            plant_dead_writers(crashed, args.dead_writers, args.files_each)
            os.sync()
            for storage in (clean, crashed):
                ready, done = start_time(storage)
                times[storage].append(ready)
                if storage == crashed:
                    cleaned.append(done)
        base = statistics.median(times[clean])
        dead = args.dead_writers * (args.files_each + 2)
        table(
            f"Start until /v2/ answers (seconds, {args.runs} runs each, interleaved)",
            ["storage", "stale entries", "best", "median", "x baseline"],
            [
                ("clean (baseline)", 0, min(times[clean]), base, 1.0),
                (f"{args.dead_writers} dead writers", dead, min(times[crashed]),
                 statistics.median(times[crashed]), statistics.median(times[crashed]) / base),
                ("  ... until all removed (background)", dead, min(cleaned),
                 statistics.median(cleaned), statistics.median(cleaned) / base),
            ],
        )  # fmt: skip

        storage = Path(tmp) / "verify"
        with server(storage=storage) as host:
            digest, size = largest_layer(host, args.image)
        rows = []
        for _ in range(args.runs):
            with server(storage=storage) as host:  # a restart: nothing is verified yet
                first = download(host, args.image, digest)
                second = download(host, args.image, digest)
            rows.append((first, second))
        data = (storage / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
        started = time.monotonic()
        hashlib.sha256(data).hexdigest()
        hash_rate = size / (time.monotonic() - started) / (1 << 20)
    firsts, seconds = [r[0] for r in rows], [r[1] for r in rows]
    table(
        f"Download of a {size / (1 << 20):.0f} MiB layer right after a restart "
        f"(seconds, {args.runs} restarts)",
        ["download", "best", "median", "x verified"],
        [
            ("second (already verified, baseline)", min(seconds), statistics.median(seconds), 1.0),
            ("first (hashed before serving)", min(firsts), statistics.median(firsts),
             statistics.median(firsts) / statistics.median(seconds)),
        ],
    )  # fmt: skip
    print(f"\nsha256 in this process: {hash_rate:.0f} MiB/s")
    print("Target: start under a second with any number of dead writers.")


if __name__ == "__main__":
    main()
