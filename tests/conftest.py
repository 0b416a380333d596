"""Shared fixtures: the offline package set and a real server process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

from tests import s3server
from tests.clients import Containerd
from tests.gated import GatedPackage, make_gated_package

# Property tests check what is accepted, never how fast: a per-example
# deadline only measures how busy the machine is.
settings.register_profile("nixery", deadline=None)
settings.load_profile("nixery")

FIXTURE_PKGS = Path(__file__).parent / "fixtures" / "pkgs"

# No binary cache is reachable here; the fixture builds from local files.
os.environ.setdefault("NIX_CONFIG", "substituters =\nextra-platforms = aarch64-linux")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    host: str  # host:port, as clients name the registry
    storage: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


StartServer = Callable[..., Server]


def launch_server(
    base: Path, *args: str, env: dict[str, str] | None = None, storage: Path | None = None
) -> Server:
    """Start `nixery serve` on a free port (HTTPS with --tls-cert) and wait until it listens.

    Without a package source among `args`, it serves the fixture package set.
    """
    base.mkdir(parents=True, exist_ok=True)
    storage = storage or base / "storage"
    port = free_port()
    log = base / f"server-{port}.log"
    argv = [sys.executable, "-m", "nixery", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--storage-path", str(storage), *args]  # fmt: skip
    sources = ("--pkgs-path", "--default-pkgs-path", "--channel", "--pkgs-repo", "--flake")
    if not any(a in args for a in sources):
        argv += ["--pkgs-path", str(FIXTURE_PKGS)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = Server(proc, f"127.0.0.1:{port}", storage, log)
    try:
        if "--tls-cert" in args:
            _wait_for_port(port)
        else:
            wait_for(server.url + "/v2/")
    except OSError:
        server.stop()
        raise RuntimeError("server did not start:\n" + server.log_text()) from None
    return server


def _wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class ServerPool:
    """Starts `nixery serve` processes and stops them all at the end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self.tmp_path_factory = tmp_path_factory
        self.servers: list[Server] = []

    def start(
        self, *args: str, storage: Path | None = None, env: dict[str, str] | None = None
    ) -> Server:
        server = launch_server(
            self.tmp_path_factory.mktemp("server"), *args, env=env, storage=storage
        )
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Start `nixery serve` on a free port; extra CLI arguments pass through."""
    pool = ServerPool(tmp_path_factory)
    yield pool.start
    pool.stop_all()


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Like `start_server`, for servers that every test of a module shares."""
    pool = ServerPool(tmp_path_factory)
    yield pool.start
    pool.stop_all()


@pytest.fixture
def server(start_server: StartServer) -> Server:
    return start_server()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    """A real S3 server (Ceph RGW), started once per session when first needed."""
    require(*s3server.BINARIES)
    server = s3server.start(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nixpkgs_2411(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full nixpkgs 24.11 tree (evaluation only), unpacked once per session."""
    from tests import nixpkgs

    unpacked = os.environ.get("NIXERY_NIXPKGS_2411")  # an unpacked tree, to skip unpacking
    if unpacked:
        return Path(unpacked)
    return nixpkgs.unpack(tmp_path_factory.mktemp("nixpkgs-24.11"))


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run .ci/run or install them (see README)")


@pytest.fixture
def gated() -> Iterator[GatedPackage]:
    """A package (added by an overlay) whose build waits for `gated.open()`."""
    package = make_gated_package()
    yield package
    package.remove()


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    """A private containerd daemon for the tests of one module."""
    require("containerd", "ctr")
    daemon = Containerd()
    yield daemon
    daemon.close()
