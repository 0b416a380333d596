"""Package sources for tests: a git repository of the fixture package set with
versions that differ by tag, and a local HTTP server that plays a nixpkgs
channel (a `git-revision` file and commit tarballs)."""

from __future__ import annotations

import gzip
import http.server
import io
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import FIXTURE_PKGS

HELLO = 'pname = "hello";\n    version = "{}";'
FIXTURE_HELLO_VERSION = "2.10"

# Exposes the package set as a flake; `self` is its only input, so it
# evaluates offline.
FLAKE = """{
  description = "The test package set as a flake";
  outputs = { self }: {
    legacyPackages = builtins.listToAttrs (map
      (system: { name = system; value = import ./. { inherit system; }; })
      [ "x86_64-linux" "aarch64-linux" ]);
  };
}
"""

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def copy_package_set(dest: Path, hello_version: str = FIXTURE_HELLO_VERSION) -> Path:
    """A copy of the fixture package set whose `hello` has `hello_version`."""
    shutil.copytree(FIXTURE_PKGS, dest)
    set_hello_version(dest, hello_version)
    return dest


def set_hello_version(pkgs: Path, version: str) -> None:
    packages = pkgs / "packages.nix"
    text = packages.read_text()
    start = text.index('pname = "hello";')
    end = text.index(";", text.index("version", start)) + 1
    packages.write_text(text[:start] + HELLO.format(version) + text[end:])


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **GIT_ENV},
    )
    return proc.stdout.strip()


@dataclass
class PkgsRepo:
    """A git repository: `v1` (annotated) and branch `stable` have hello 2.10,
    `v2` (lightweight) and the default branch `main` have hello 2.11."""

    path: Path
    commits: dict[str, str] = field(default_factory=dict)  # tag -> commit

    @property
    def url(self) -> str:
        return self.path.as_uri()

    def commit_version(self, version: str, message: str) -> str:
        set_hello_version(self.path, version)
        git(self.path, "commit", "--quiet", "-am", message)
        return git(self.path, "rev-parse", "HEAD")


def make_pkgs_repo(path: Path) -> PkgsRepo:
    copy_package_set(path, "2.10")
    (path / "flake.nix").write_text(FLAKE)
    git(path, "init", "--quiet", "--initial-branch=main")
    git(path, "add", ".")
    git(path, "commit", "--quiet", "-m", "hello 2.10")
    repo = PkgsRepo(path)
    repo.commits["v1"] = git(path, "rev-parse", "HEAD")
    git(path, "tag", "--annotate", "-m", "version 1", "v1")
    git(path, "branch", "stable")
    repo.commits["v2"] = repo.commit_version("2.11", "hello 2.11")
    git(path, "tag", "v2")
    return repo


def tarball(pkgs: Path, top: str) -> bytes:
    """A .tar.gz of a directory under one top-level directory, as GitHub serves them."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.add(pkgs, arcname=top)
    return gzip.compress(raw.getvalue())


@dataclass
class Channels:
    """What the channel server serves; tests change it while it runs."""

    revisions: dict[str, str] = field(default_factory=dict)  # channel -> commit
    tarballs: dict[str, bytes] = field(default_factory=dict)  # commit -> .tar.gz
    requests: list[str] = field(default_factory=list)
    broken: bool = False  # answer 503 to everything
    url: str = ""

    @property
    def tarball_url(self) -> str:
        return self.url + "/archive/{rev}.tar.gz"

    @property
    def revision_url(self) -> str:
        return self.url + "/channels/{channel}/git-revision"

    def count(self, suffix: str) -> int:
        return sum(1 for r in self.requests if r.endswith(suffix))


@contextmanager
def channel_server() -> Iterator[Channels]:
    channels = Channels()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the base class's name)
            channels.requests.append(self.path)
            body = self._lookup(self.path.strip("/").split("/"))
            if channels.broken:
                self.send_error(503)
            elif body is None:
                self.send_error(404)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def _lookup(self, parts: list[str]) -> bytes | None:
            if len(parts) == 3 and parts[0] == "channels" and parts[2] == "git-revision":
                rev = channels.revisions.get(parts[1])
                return None if rev is None else (rev + "\n").encode()
            if len(parts) == 2 and parts[0] == "archive" and parts[1].endswith(".tar.gz"):
                return channels.tarballs.get(parts[1].removesuffix(".tar.gz"))
            return None

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    channels.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield channels
    finally:
        server.shutdown()
        server.server_close()
