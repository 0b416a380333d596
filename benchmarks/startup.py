"""Startup: seconds from starting `nixery serve` until `/v2/` answers, with
an empty storage (baseline) and with a large one, in one run. Nothing is
scanned at start, so the size of the cache must not matter.

    .venv/bin/python -m benchmarks.startup [--blobs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import FIXTURE_PKGS, free_port, machine, table, wait_http


def fill(storage: Path, blobs: int) -> None:
    """`blobs` small blobs and as many layer documents (content is irrelevant)."""
    blob_dir = storage / "blobs" / "sha256"
    docs = storage / "documents" / "layers"
    blob_dir.mkdir(parents=True)
    docs.mkdir(parents=True)
    for i in range(blobs):
        name = f"{i:064x}"
        (blob_dir / name).write_bytes(b"x")
        (docs / f"{name}.json").write_bytes(b"{}")


def start_time(storage: Path) -> float:
    port = free_port()
    argv = [sys.executable, "-m", "nixery", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--storage-path", str(storage), "--pkgs-path", str(FIXTURE_PKGS)]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/")
        return time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
        empty, full = Path(tmp) / "empty", Path(tmp) / "full"
        fill(full, args.blobs)
        os.sync()
        times: dict[Path, list[float]] = {empty: [], full: []}
        for _ in range(args.runs):
            for storage in (empty, full):
                times[storage].append(start_time(storage))
    base = statistics.median(times[empty])
    rows = [
        ("empty storage (baseline)", 0, min(times[empty]), base, 1.0),
        (f"{args.blobs} blobs + {args.blobs} documents", args.blobs, min(times[full]),
         statistics.median(times[full]), statistics.median(times[full]) / base),
    ]  # fmt: skip
    table(
        f"Start until /v2/ answers (seconds, {args.runs} runs each, interleaved)",
        ["storage", "blobs", "best", "median", "x baseline"],
        rows,
    )
    print("\nTarget: /v2/ answers within a second, whatever the cache size.")


if __name__ == "__main__":
    main()
