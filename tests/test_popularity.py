"""Popularity data: loading it (and refusing bad data) and counting it."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixery.errors import CommandError, ConfigError
from nixery.packages import process
from nixery.packages.graph import store_path_name
from nixery.packages.popularity import load_popularity, parse_popularity
from tests.conftest import FIXTURE_PKGS, StartServer, free_port


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "is not valid JSON"),
        (b"[1, 2]", "must be a JSON object of name -> count, not list"),
        (b'"glibc"', "not str"),
        (b'{"glibc-2.36": -1}', "bad entries: 'glibc-2.36'"),
        (b'{"glibc-2.36": 1.5}', "counts must be non-negative integers"),
        (b'{"glibc-2.36": "12"}', "bad entries: 'glibc-2.36'"),
        (b'{"glibc-2.36": true}', "bad entries: 'glibc-2.36'"),
        (b'{"": 3}', "names non-empty"),
    ],
)
def test_bad_data_is_refused_with_the_reason(raw: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_popularity(raw, "pop.json")
    assert message in str(err.value)
    assert "pop.json" in str(err.value)


def test_good_data_loads_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pop.json"
    path.write_text('{"glibc-2.36": 59, "zlib-1.2.13": 11, "unused": 0}')
    assert load_popularity(str(path)) == {"glibc-2.36": 59, "zlib-1.2.13": 11, "unused": 0}


def test_missing_file_and_unsupported_scheme(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read popularity data from .*No such file"):
        load_popularity(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="cannot read popularity data"):
        load_popularity(str(tmp_path))
    with pytest.raises(ConfigError, match="only http"):
        load_popularity("ftp://127.0.0.1/pop.json")


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 (the handler API)
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"not found")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def web() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `_Files.files`."""
    _Files.files = {"/pop.json": b'{"glibc-2.36": 7}', "/bad.json": b"<html>"}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls(web: str) -> None:
    assert load_popularity(web + "/pop.json") == {"glibc-2.36": 7}
    with pytest.raises(ConfigError, match="HTTP 404"):
        load_popularity(web + "/missing.json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_popularity(web + "/bad.json")
    with pytest.raises(ConfigError, match="cannot fetch popularity data"):
        load_popularity(f"http://127.0.0.1:{free_port()}/pop.json", timeout=5)


def serve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "nixery", "serve", "--host", "127.0.0.1",
            "--port", str(free_port()), "--pkgs-path", str(FIXTURE_PKGS), *args]  # fmt: skip


@pytest.mark.e2e
@pytest.mark.parametrize("bad", ["missing.json", "bad.json", "http://127.0.0.1:9/pop.json"])
def test_server_refuses_to_start_with_bad_popularity(tmp_path: Path, bad: str) -> None:
    (tmp_path / "bad.json").write_text('{"glibc": "many"}')
    source = bad if bad.startswith("http") else str(tmp_path / bad)
    argv = serve_argv("--storage-path", str(tmp_path / "storage"), "--popularity", source)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert f"popularity data from {source}" in proc.stderr.removeprefix("Error: ")
    # The same through the environment variable the original used.
    env = {**os.environ, "NIX_POPULARITY_URL": source}
    argv = serve_argv("--storage-path", str(tmp_path / "storage"))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert proc.returncode == 1
    assert f"popularity data from {source}" in proc.stderr


@pytest.mark.e2e
def test_server_starts_without_popularity_or_with_good_data(
    start_server: StartServer, tmp_path: Path, web: str
) -> None:
    start_server()  # nothing requested: starts without popularity data
    server = start_server("--popularity", web + "/pop.json")
    assert "popularity data for 1 names" in server.log_text()


@pytest.mark.nix
def test_popcount_counts_the_fixture_package_set(tmp_path: Path) -> None:
    out = tmp_path / "popularity.json"
    argv = [sys.executable, "-m", "nixery", "popcount", "--pkgs-path", str(FIXTURE_PKGS)]
    proc = subprocess.run(
        [*argv, "-o", str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "building packages" in proc.stderr  # the progress display
    assert "skipped broken" in proc.stderr
    counted = json.loads(out.read_text())

    # The same numbers, one package at a time, straight from Nix.
    top_level = (
        f"let pkgs = import {FIXTURE_PKGS} {{ }}; in builtins.filter"
        ' (n: (builtins.tryEval ((pkgs.${n}.type or null) == "derivation")).value)'
        " (builtins.attrNames pkgs)"
    )
    listing = process.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr", top_level])

    expected: Counter[str] = Counter()
    outs = set()
    for attr in json.loads(listing.stdout):
        try:
            built = process.run(
                ["nix-build", str(FIXTURE_PKGS), "--no-out-link", "-A", attr], timeout=300
            ).stdout.split()
        except CommandError:  # does not build
            continue
        if len(built) == 1 and built[0] not in outs:
            outs.add(built[0])
            requisites = process.run(["nix-store", "--query", "--requisites", built[0]]).stdout
            expected.update({store_path_name(p) for p in requisites.split()})
    assert counted == dict(expected)
    assert max(counted, key=counted.__getitem__) == "glibc-2.36"
    assert f"counted {len(outs)} packages" in proc.stderr


@pytest.mark.nix
def test_popcount_reports_bad_sources(tmp_path: Path) -> None:
    def popcount(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "nixery", "popcount", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    missing = popcount("--pkgs-path", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    broken = tmp_path / "broken.nix"
    broken.write_text('{ system, ... }: throw "no package set here"')
    failed = popcount("--pkgs-path", str(broken))
    assert failed.returncode == 1 and "no package set here" in failed.stderr
