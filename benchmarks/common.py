"""Helpers shared by the benchmarks: a real server, Nix, tables."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nixery.assembly.manifest import negotiate
from nixery.images.activity import Build, BuildEvents, BuildRecord
from nixery.images.model import BuildProfile, BuildSettings
from nixery.images.service import ImageService
from nixery.packages.nix import Nix
from nixery.packages.sources import SourceConfig, Sources
from nixery.storage import FilesystemStorage

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_PKGS = ROOT / "tests" / "fixtures" / "pkgs"
OVERLAYS = Path(__file__).resolve().parent / "overlays"
OCI = "application/vnd.oci.image.manifest.v1+json"
# The reference image: programs and libraries of many sizes (48 store paths).
REFERENCE_IMAGE = "shell/curl/git/python3/jq/openssl/sqlite/file/wget/strace/gnumake"
# Over 100 MB in 35 layers: the reference image and three packages of text
# files (with the overlay below).
LARGE_IMAGE = REFERENCE_IMAGE + "/vimfiles/perlfiles/cmakefiles"
LARGE_OVERLAY = Path(__file__).resolve().parent / "overlays" / "host-text.nix"

# No binary cache is reachable here; the fixture builds from local files.
os.environ.setdefault("NIX_CONFIG", "substituters =\nextra-platforms = aarch64-linux")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> float:
    """Seconds until `url` answers at all."""
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return time.monotonic() - started
        except urllib.error.HTTPError:
            return time.monotonic() - started
        except OSError:
            if time.monotonic() - started > timeout:
                raise
            time.sleep(0.01)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    storage: Path
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def peak_rss_mib(self) -> float:
        return _status_kib(self.process.pid, "VmHWM") / 1024

    def rss_mib(self) -> float:
        return _status_kib(self.process.pid, "VmRSS") / 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextmanager
def nixery(*args: str, storage: Path | None = None, tree: Path | None = None) -> Iterator[Server]:
    """A real `nixery serve` on a free port, stopped on exit; with `tree`, the
    `nixery` of that source tree (e.g. main before a change)."""
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryDirectory(prefix="nixery-bench-") as tmp:
        storage = storage or Path(tmp) / "storage"
        port = free_port()
        log = Path(tmp) / "server.log"
        argv = [sys.executable, "-m", "nixery", "serve", "--host", "127.0.0.1",
                "--port", str(port), "--storage-path", str(storage), "--nix-timeout", "600",
                *args]  # fmt: skip
        if not any(a in args for a in ("--pkgs-path", "--channel", "--pkgs-repo")):
            argv += ["--pkgs-path", str(FIXTURE_PKGS)]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT)
        server = Server(proc, port, storage, log)
        try:
            wait_http(server.url + "/v2/")
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def get(url: str, accept: str = OCI, timeout: float = 900) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def manifest(server: Server, image: str, accept: str = OCI) -> dict:
    status, body, _ = get(f"{server.url}/v2/{image}/manifests/latest", accept)
    if status != 200:
        raise RuntimeError(f"{image}: {status} {body[:500]!r}\n{server.log_text()[-3000:]}")
    return json.loads(body)


def nix_build(*attrs: str, overlays: Sequence[Path] = ()) -> list[str]:
    """Realise fixture packages (so that benchmarks measure the registry, not
    the fixture's builds); returns their store paths."""
    if overlays:
        imports = " ".join(f"(import {o})" for o in overlays)
        expr = f"import {FIXTURE_PKGS} {{ overlays = [ {imports} ]; }}"
        argv = ["nix-build", "--no-out-link", "-E", expr]
    else:
        argv = ["nix-build", "--no-out-link", str(FIXTURE_PKGS)]
    for attr in attrs:
        argv += ["-A", attr]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()


def closure(paths: Sequence[str]) -> list[str]:
    argv = ["nix-store", "--query", "--requisites", *paths]
    return sorted(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split())


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing {missing}: apt-get install $(cat benchmarks/apt-packages.txt)")


def best_of(runs: int, fn: Callable[[], float]) -> tuple[float, float]:
    """(best, median) of `runs` measurements."""
    values = [fn() for _ in range(runs)]
    return min(values), statistics.median(values)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def machine() -> str:
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    return f"{cores} cores, load average {load:.2f} at start"


class Recorder(BuildEvents):
    """Keeps the profile of every build that finished."""

    def __init__(self) -> None:
        self.profiles: list[BuildProfile] = []

    def build_ended(self, build: Build, record: BuildRecord) -> None:
        if record.ok:
            self.profiles.append(BuildProfile.from_json(record.profile))


def build_in_process(
    storage_dir: str | Path,
    image: str = REFERENCE_IMAGE,
    compression: str = "gzip",
    overlays: Sequence[Path] = (),
) -> BuildProfile | None:
    """Ask an in-process `ImageService` for `image`; the build's profile, or
    None when the image was already stored."""
    recorder = Recorder()
    nix = Nix(timeout=600)
    overlay_paths = tuple(str(o) for o in overlays)
    service = ImageService(
        FilesystemStorage(storage_dir),
        nix,
        Sources(SourceConfig("path", str(FIXTURE_PKGS)), nix, overlay_paths),
        BuildSettings(compression=compression, overlays=overlay_paths),
        events=recorder,
    )
    service.manifest(image, "latest", negotiate([OCI]))
    return recorder.profiles[0] if recorder.profiles else None
