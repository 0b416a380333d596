"""Popularity data: loading it (and refusing bad data) and counting it."""

from __future__ import annotations

import hashlib
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
from nixery.packages.popularity import (
    NO_DATA,
    PopularityByRevision,
    is_template,
    load_popularity,
    parse_popularity,
)
from tests.conftest import FIXTURE_PKGS, Server, StartServer, free_port
from tests.http import Reply, call
from tests.sourcefixtures import channel_server, copy_package_set, tarball


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
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the handler API)
        self.requests.append(self.path)
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
    _Files.requests = []
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


OCI = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def get_manifest(server: Server, name: str) -> Reply:
    return call(server.host, "GET", f"/v2/{name}/manifests/latest", OCI)


COMMIT = "a" * 40
OTHER = "b" * 40


def test_a_template_is_fetched_once_per_revision_and_kept_on_disk(web: str, tmp_path: Path) -> None:
    _Files.files["/pop-nixos-23.11-" + COMMIT + ".json"] = b'{"glibc-2.38": 9}'
    _Files.files["/pop-nixos-23.11-" + OTHER + ".json"] = b'{"glibc-2.38": 4}'
    template = web + "/pop-{channel}-{revision}.json"
    assert is_template(template) and not is_template(web + "/pop.json")
    data = PopularityByRevision(template, str(tmp_path))
    first = data.counts("nixos-23.11", f"commit:{COMMIT}")
    assert first.popularity == {"glibc-2.38": 9}
    # Overlays change the revision, not the package set the data counts.
    assert data.counts("nixos-23.11", f"commit:{COMMIT}+overlays:1234") == first
    assert _Files.requests == ["/pop-nixos-23.11-" + COMMIT + ".json"]
    other = data.counts("nixos-23.11", f"commit:{OTHER}")
    assert other.popularity == {"glibc-2.38": 4} and other.digest != first.digest
    assert len(_Files.requests) == 2
    # A restart (or another replica sharing the directory) reads the disk.
    again = PopularityByRevision(template, str(tmp_path))
    assert again.counts("nixos-23.11", f"commit:{COMMIT}") == first
    assert again.fetches == 0 and len(_Files.requests) == 2


def test_a_template_without_data_lays_out_without_it(
    web: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    data = PopularityByRevision(
        web + "/pop-{revision}.json", str(tmp_path), retry_after=60, clock=lambda: now[0]
    )
    assert data.counts(None, f"commit:{COMMIT}") == NO_DATA
    assert "without popularity data" in caplog.text and "HTTP 404" in caplog.text
    assert data.counts(None, f"commit:{COMMIT}") == NO_DATA
    assert len(_Files.requests) == 1  # a failure is not retried at once
    _Files.files[f"/pop-{COMMIT}.json"] = b'{"zlib-1.3": 2}'
    now[0] = 61.0
    assert data.counts(None, f"commit:{COMMIT}").popularity == {"zlib-1.3": 2}
    assert len(_Files.requests) == 2
    # Invalid data is no data either, and is not kept.
    _Files.files[f"/pop-{OTHER}.json"] = b"<html>"
    assert data.counts(None, f"commit:{OTHER}") == NO_DATA
    assert "not valid JSON" in caplog.text
    assert len(os.listdir(tmp_path / "popularity")) == 1  # no temporary files left
    # A source with no channel (or no commit) cannot fill the template in.
    by_channel = PopularityByRevision(web + "/{channel}.json", str(tmp_path))
    assert by_channel.counts(None, f"commit:{COMMIT}") == NO_DATA
    assert data.counts(None, "path:/srv/pkgs@1234") == NO_DATA
    assert len(_Files.requests) == 3 and by_channel.fetches == 0
    # Nothing from the request reaches the URL unquoted.
    assert by_channel.url("a/../b?c", "commit:" + COMMIT) == web + "/a%2F..%2Fb%3Fc.json"


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


@pytest.mark.e2e
@pytest.mark.nix
def test_server_fetches_popularity_per_channel_revision(
    start_server: StartServer, tmp_path: Path, web: str
) -> None:
    commit = hashlib.sha1(b"2.10").hexdigest()
    served = f"/popularity-nixos-test-{commit}.json"
    _Files.files[served] = b'{"glibc-2.36": 50, "hello-2.10": 3}'
    with channel_server() as channels:
        channels.tarballs[commit] = tarball(copy_package_set(tmp_path / "pkgs"), "nixpkgs")
        channels.revisions["nixos-test"] = commit
        source = ("--channel", "nixos-test", "--channel-url", channels.tarball_url,
                  "--channel-revision-url", channels.revision_url,
                  "--source-cache", str(tmp_path / "cache"))  # fmt: skip
        template = web + "/popularity-{channel}-{revision}.json"
        first = start_server(*source, "--popularity", template)
        hello = get_manifest(first, "hello")
        assert hello.status == 200 and get_manifest(first, "shell").status == 200
        assert _Files.requests == [served]  # once for the revision, at the first build
        # Another replica (or a rebuild into empty storage) reads the data
        # kept on disk and lays the image out the same, to the digest.
        second = start_server(*source, "--popularity", template)
        assert get_manifest(second, "hello").body == hello.body
        assert _Files.requests == [served]
        # Without data for the revision the image is built all the same.
        missing = start_server(*source, "--popularity", web + "/none-{revision}.json")
        without = get_manifest(missing, "hello")
        assert without.status == 200
        assert "without popularity data" in missing.log_text()
        assert "HTTP 404" in missing.log_text()
