"""The GC roots that keep an image's derivations and store paths alive while
it is built must exist from the evaluation on, and be where the Nix garbage
collector looks for them.

A systemd service with `PrivateTmp=true` has a /tmp of its own, which the
nix-daemon (the collector) does not see: a root registered there points
nowhere for the collector. Here the registry runs with such a private
directory (bubblewrap mounts a tmpfs over it for the server only, and it is
the server's TMPDIR) against a single-user Nix store of the test's own, so
the collector can run without touching the machine's store. `nix-store
--gc` runs in a loop for the whole request, evaluation included (while a
Nix command runs, Nix's own temporary roots keep what it uses), and a
wrapper around the server's `nix-store` holds each call that follows a
step of the build (`--realise`, after the evaluation has written the
packages' derivations; `--query`, after the build) until one whole
collection has run since it was called. So every build meets the collector
between the evaluation and the build, and between the build and the packing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nixery.errors import BuildFailed
from nixery.packages.nix import Nix, NixSource
from tests.clients import run, umoci_unpack
from tests.conftest import FIXTURE_PKGS, Server, free_port, require, wait_for
from tests.http import call

pytestmark = pytest.mark.e2e

SOURCE = NixSource("path", str(FIXTURE_PKGS))

# Holds every `nix-store --realise` (the build, whose derivations the
# evaluation wrote just before) and `--query` (what was just written or
# built is read next) until the collector has finished a pass that started
# after the call.
WRAPPER = """#!/bin/sh
case " $* " in
*" --realise "*|*" --query "*)
  request="$NIXERY_TEST_SYNC/request.$$"
  : > "$request"
  i=0
  while [ ! -e "$request.done" ] && [ $i -lt 6000 ]; do sleep 0.05; i=$((i+1)); done
  ;;
esac
exec @NIX_STORE@ "$@"
"""


@dataclass
class Store:
    """A single-user Nix store in a directory of its own."""

    root: Path

    @property
    def env(self) -> dict[str, str]:
        url = f"local?store={self.root}/store&state={self.root}/state&log={self.root}/log"
        return {**os.environ, "NIX_REMOTE": url}

    def valid(self, path: str) -> bool:
        argv = ["nix-store", "--check-validity", path]
        return subprocess.run(argv, env=self.env, capture_output=True).returncode == 0


class Collector:
    """`nix-store --gc` over and over, answering the wrapper's requests."""

    def __init__(self, store: Store, sync: Path) -> None:
        self.store = store
        self.sync = sync
        self.passes = 0
        self.error: str | None = None  # why the loop stopped early, if it did
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)
        assert self.error is None, f"the collector stopped: {self.error}"

    def _loop(self) -> None:
        while not self._stop.is_set():
            waiting = [p for p in self.sync.glob("request.*") if p.suffix != ".done"]
            proc = subprocess.run(
                ["nix-store", "--gc"], env=self.store.env, capture_output=True, text=True
            )
            if proc.returncode != 0 and "is busy" in proc.stderr:
                continue  # a build holds the store's database: the pass is run again
            if proc.returncode != 0:
                self.error = proc.stderr
                # Release the held requests, so the server's answer shows the failure.
                for request in waiting:
                    Path(f"{request}.done").touch()
                return
            self.passes += 1
            for request in waiting:
                Path(f"{request}.done").touch()


@pytest.fixture
def store() -> Iterator[Store]:
    # Builders run as nixbld users: the store must be reachable by them,
    # which pytest's private temporary directories are not.
    scratch = Path(tempfile.mkdtemp(prefix="nixery-store-"))
    scratch.chmod(0o755)
    (scratch / "nix").mkdir()
    store = Store(scratch / "nix")
    # Nix sets a new store up (state directories, the profiles root) on first
    # use; two processes doing it at once race ("File exists"): once, first.
    subprocess.run(["nix-store", "--gc"], env=store.env, check=True, capture_output=True)
    yield store
    shutil.rmtree(scratch, onerror=_writable_then_retry)


def _writable_then_retry(func: Any, path: str, _exc: object) -> None:
    # Nix leaves store paths read-only.
    os.chmod(os.path.dirname(path), 0o755)
    func(path)


@pytest.fixture
def start_registry(tmp_path: Path, store: Store) -> Iterator[Any]:
    require("bwrap")
    started: list[Server] = []
    # Beside the store, where builders (nixbld users) may enter.
    private = store.root.parent / "private-tmp"
    private.mkdir()
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    wrapper = wrappers / "nix-store"
    real = shutil.which("nix-store")
    assert real
    wrapper.write_text(WRAPPER.replace("@NIX_STORE@", real))
    wrapper.chmod(0o755)
    sync = tmp_path / "sync"
    sync.mkdir()

    def start(*args: str) -> Server:
        port = free_port()
        log = tmp_path / f"server-{port}.log"
        env = {
            **store.env,
            "PATH": f"{wrappers}:{os.environ['PATH']}",
            "TMPDIR": str(private),
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "NIXERY_TEST_SYNC": str(sync),
        }
        # Like PrivateTmp=true: the server's TMPDIR is a tmpfs only it sees.
        argv = ["bwrap", "--dev-bind", "/", "/", "--tmpfs", str(private), "--die-with-parent",
                "--", sys.executable, "-m", "nixery", "serve", "--host", "127.0.0.1",
                "--port", str(port), "--storage-path", str(tmp_path / "storage"),
                "--pkgs-path", str(FIXTURE_PKGS), "--nix-timeout", "600", *args]  # fmt: skip
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
        registry = Server(proc, f"127.0.0.1:{port}", tmp_path / "storage", log)
        started.append(registry)
        wait_for(f"http://{registry.host}/v2/", timeout=60)
        return registry

    start.sync = sync  # type: ignore[attr-defined]
    start.private = private  # type: ignore[attr-defined]
    yield start
    for registry in started:
        registry.stop()


def test_collection_during_a_build_keeps_the_images_paths(
    start_registry: Any, store: Store, tmp_path: Path
) -> None:
    require("skopeo", "umoci")
    # Default roots directory: under $XDG_CACHE_HOME, which the collector sees.
    registry = start_registry()
    with Collector(store, start_registry.sync) as collector:
        response = call(registry.host, "GET", "/v2/hello/manifests/latest", timeout=600)
        assert response.status == 200, response.body.decode()
        held = list(start_registry.sync.glob("request.*.done"))
        # The result of the evaluation and the build's --realise (the closure is
        # read with `nix path-info` after it, under the roots --realise added).
        assert len(held) >= 2, "the build did not meet the collector at every step"
        passes = collector.passes
        layout = tmp_path / "layout"
        run(["skopeo", "copy", "--src-tls-verify=false",
             f"docker://{registry.host}/hello:latest", f"oci:{layout}:latest"])  # fmt: skip
    assert passes >= 1
    rootfs = umoci_unpack(layout, tmp_path / "bundle")
    # Not tests.clients.bwrap_run: its private /tmp would hide this store's paths.
    argv = ["bwrap", "--bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev",
            "--unshare-all", "--die-with-parent", "--clearenv", "--setenv", "PATH", "/bin",
            "--", "hello"]  # fmt: skip
    assert run(argv).stdout.strip() == "Hello, world!"
    # Nothing else roots what was built: once the build is over, it goes.
    hello = next(rootfs.glob(f"{str(store.root).lstrip('/')}/store/*-hello-2.10"))
    built = "/" + str(hello.relative_to(rootfs))
    subprocess.run(["nix-store", "--gc"], env=store.env, check=True, capture_output=True)
    assert not store.valid(built)


def test_roots_the_collector_cannot_see_do_not_keep_the_paths(
    start_registry: Any, store: Store
) -> None:
    # Roots inside the server's private directory, as /tmp under PrivateTmp.
    hidden = start_registry.private / "gc-roots"
    registry = start_registry("--gc-roots-dir", str(hidden))
    with Collector(store, start_registry.sync):
        response = call(registry.host, "GET", "/v2/hello/manifests/latest", timeout=600)
    # The collector deleted what the evaluation wrote before it was read.
    assert response.status == 500, response.body.decode()
    assert "reading the evaluation's result failed" in response.body.decode()
    assert "nixery-resolution.drv' does not exist" in response.body.decode()


def test_derivations_are_rooted_from_the_evaluation_on(store: Store, tmp_path: Path) -> None:
    """A collection between the evaluation and the build, through the calls
    the registry makes: the derivations survive only with the roots."""
    nix = Nix(timeout=600, env=store.env, gc_roots_dir=str(tmp_path / "gc-roots"))
    with nix.temporary_roots() as roots:
        packages = nix.resolve(SOURCE, "x86_64-linux", ["hello"], roots=roots)
        collect(store)
        assert all(store.valid(p.drv) for p in packages)
        [out] = nix.realise(packages, roots=roots)
        collect(store)
        assert store.valid(out)
    collect(store)
    assert not store.valid(out)
    assert not any(store.valid(p.drv) for p in packages)
    # Without roots, the evaluation leaves its derivations to the collector.
    packages = nix.resolve(SOURCE, "x86_64-linux", ["hello"])
    collect(store)
    assert not any(store.valid(p.drv) for p in packages)
    with pytest.raises(BuildFailed, match="building the image's packages failed"):
        nix.realise(packages)


def collect(store: Store) -> None:
    subprocess.run(["nix-store", "--gc"], env=store.env, check=True, capture_output=True)
