"""The HTTP server under abuse: TLS, idle and slow clients, oversized requests, rate limits."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from nixery.assembly.manifest import OCI_MANIFEST
from nixery.http.ratelimit import TokenBuckets
from tests.attack import raw_request, self_signed_certificate
from tests.clients import run
from tests.conftest import Server, StartServer, launch_server, require
from tests.http import call

pytestmark = pytest.mark.e2e


def client_hello(host: str) -> bytes:
    """The first bytes a TLS client sends (what Go clients probe a registry with)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_tls_client_hello_on_plain_port_gets_http_400(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", int(server.host.split(":")[1])), 10) as sock:
        sock.sendall(client_hello("127.0.0.1"))
        reply = sock.recv(64)
    assert reply.startswith(b"HTTP/1.1 400 "), reply
    assert call(server.host, "GET", "/v2/").status == 200


def test_tls_serves_pulls_and_survives_silent_handshakes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    require("skopeo")
    base = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(base)
    server = launch_server(base, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        # Silent clients never finish a handshake; they must not stall the others.
        silent = [socket.create_connection(("127.0.0.1", port(server))) for _ in range(50)]
        assert raw_request(server.host, b"/v2/", tls=ctx, timeout=30).status == 200
        plain = raw_request(server.host, b"/v2/", timeout=30)
        assert plain.status == 400 and b"HTTPS" in plain.body  # plain HTTP is never served
        certs = base / "certs.d"
        certs.mkdir()
        (certs / "ca.crt").write_bytes(cert.read_bytes())
        inspect = run(["skopeo", "inspect", "--cert-dir", str(certs),
                       f"docker://{server.host}/hello"])  # fmt: skip
        assert json.loads(inspect.stdout)["Layers"]
        for sock in silent:
            sock.close()
    finally:
        server.stop()


def port(server: Server) -> int:
    return int(server.host.rsplit(":", 1)[1])


def hang_up_mid_response(server: Server, path: str, tls: ssl.SSLContext) -> None:
    """Ask for `path`, read a little, then reset the connection."""
    sock = socket.create_connection(("127.0.0.1", port(server)), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with tls.wrap_socket(sock, server_hostname="127.0.0.1") as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
        conn.recv(1024)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_tls_serves_ranges_and_takes_hang_ups_quietly(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Over TLS blobs are not sent with sendfile(2): the server reads the file itself."""
    base = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(base)
    args = ("--tls-cert", str(cert), "--tls-key", str(key), "--log-format", "json")
    server = launch_server(base, *args)
    try:
        tls = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", port(server), context=tls, timeout=120)
        conn.request("GET", "/v2/hello/manifests/latest", headers={"Accept": OCI_MANIFEST})
        layers = json.loads(conn.getresponse().read())["layers"]
        path = "/v2/hello/blobs/" + max(layers, key=lambda layer: layer["size"])["digest"]
        conn.request("GET", path)
        whole = conn.getresponse().read()
        size = len(whole)
        assert size > 1 << 20  # more than one read of the file
        # One connection throughout: each answer must end where its length says.
        for first, last in ((0, 99), (10, size // 2), (size - 7, size - 1), (5, size - 2)):
            conn.request("GET", path, headers={"Range": f"bytes={first}-{last}"})
            part = conn.getresponse()
            assert part.status == 206, part.read()[:200]
            assert part.getheader("Content-Range") == f"bytes {first}-{last}/{size}"
            assert part.read() == whole[first : last + 1]
        conn.close()

        for _ in range(10):
            hang_up_mid_response(server, path, tls)
        assert raw_request(server.host, b"/v2/", tls=tls, timeout=30).status == 200
    finally:
        server.stop()
    # Clients that hang up are no server error, and every log line stays JSON.
    lines = server.log_text().splitlines()
    assert lines and [line for line in lines if not _json_object(line)] == []
    records = [_json_object(line) for line in lines]
    assert [
        r for r in records if r["logger"] == "nixery.http.server" and r["level"] != "INFO"
    ] == []


def _json_object(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def test_idle_and_slow_clients_do_not_hold_all_workers(server: Server) -> None:
    """300 idle connections and 40 slow-loris heads (more than the 32 worker threads)."""
    idle = [socket.create_connection(("127.0.0.1", port(server))) for _ in range(300)]
    slow = []
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", port(server)))
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
        slow.append(sock)
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(1):
            for sock in slow:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        # Without the head deadline this waits for as long as the drip goes on.
        assert call(server.host, "GET", "/v2/", timeout=60).status == 200
    finally:
        stop.set()
        dripper.join()
        for sock in idle + slow:
            sock.close()
    assert call(server.host, "GET", "/v2/").status == 200


def test_oversized_requests_are_refused(server: Server) -> None:
    long_target = b"/v2/" + b"a" * 70_000 + b"/manifests/latest"
    assert raw_request(server.host, long_target).status in (400, 414)
    big_header = b"X-Big: " + b"x" * 70_000 + b"\r\n"
    assert raw_request(server.host, b"/v2/", headers=big_header).status in (400, 413, 431)
    body = b"x" * (2 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", port(server)), timeout=30) as sock:
        sock.sendall(
            b"PUT /v2/hello/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        try:
            sock.sendall(body)
        except OSError:
            pass
        reply = sock.recv(64)
    assert reply.split(b" ")[1] in (b"405", b"413"), reply
    assert call(server.host, "GET", "/v2/").status == 200


def status_from(source: str, server: Server, path: str) -> int:
    """A GET sent from another loopback address: another client to the server."""
    conn = http.client.HTTPConnection(server.host, timeout=60, source_address=(source, 0))
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_rate_limit_answers_429_with_retry_after(start_server: StartServer) -> None:
    # One request per 1000 seconds: no token comes back while the test runs,
    # whatever the machine's load (refilling is tested with a clock below).
    server = start_server("--rate-limit", "0.001", "--rate-burst", "5")
    # The fixture's readiness probe spent one request of the burst.
    statuses = [call(server.host, "GET", "/v2/").status for _ in range(8)]
    assert statuses == [200] * 4 + [429] * 4
    reply = call(server.host, "GET", "/v2/")
    assert reply.status == 429 and reply.error_codes() == ["TOOMANYREQUESTS"]
    assert 1 <= int(reply.require_header("Retry-After")) <= 1000
    # X-Forwarded-For is the client's say-so; it must not open a new bucket.
    forged = call(server.host, "GET", "/v2/", {"X-Forwarded-For": "10.9.8.7"})
    assert forged.status == 429
    # Health probes and metric scrapes from a throttled address still pass.
    assert call(server.host, "GET", "/healthz").status == 200
    assert call(server.host, "GET", "/metrics").status == 200
    assert call(server.host, "GET", "/livez").status == 200
    # Another address has a bucket of its own, with its whole burst.
    assert [status_from("127.0.0.2", server, "/v2/") for _ in range(6)] == [200] * 5 + [429]
    assert call(server.host, "GET", "/v2/").status == 429


def test_token_buckets_refill_and_forget() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=1, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(1.0)
    assert buckets.take("b") == 0  # each client has its own bucket
    now[0] = 1.5
    assert buckets.take("a") == 0


def test_token_buckets_never_charge_a_request_for_time_seen_by_a_later_one() -> None:
    """Two requests at once: the one that read the clock first is slowed down
    (by the clock itself) until the other has been counted."""
    first_read = threading.Event()
    second_counted = threading.Event()
    readings = iter([0.0, 5.0, 6.0])

    def clock() -> float:
        value = next(readings)
        if value == 5.0:
            first_read.set()
            # With the clock read under the lock, the other request waits instead.
            second_counted.wait(1)
        return value

    buckets = TokenBuckets(rate=1, burst=2, clock=clock)
    assert buckets.take("a") == 0  # at 0: one token left, and the bucket is full again at 1
    waits: dict[str, float] = {}
    first = threading.Thread(target=lambda: waits.update(first=buckets.take("a")))
    first.start()
    assert first_read.wait(10)
    waits["second"] = buckets.take("a")
    second_counted.set()
    first.join(10)
    assert waits == {"first": 0, "second": 0}  # two tokens at 5 and 6, two requests


def test_unknown_tls_files_are_a_clear_startup_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nixery", "serve", "--storage-path", str(tmp_path),
         "--tls-cert", str(tmp_path / "c"), "--tls-key", str(tmp_path / "k"), "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "TLS file" in proc.stderr


def test_image_size_and_package_count_limits(start_server: StartServer) -> None:
    overlay = Path(__file__).parent / "fixtures" / "robustness" / "overlay.nix"
    server = start_server(
        "--overlay", str(overlay), "--max-image-size", "12M", "--max-packages", "3"
    )
    big = call(server.host, "GET", "/v2/big20/manifests/latest")
    assert big.status == 403 and big.error_codes() == ["DENIED"]
    detail = big.json()["errors"][0]["detail"]
    assert detail["max_image_size"] == 12 << 20 and detail["closure_size"] > 20 << 20
    assert not any((server.storage / "blobs" / "sha256").iterdir())  # nothing was packed
    assert call(server.host, "GET", "/v2/hello/manifests/latest").status == 200
    many = call(server.host, "GET", "/v2/hello/jq/xz/zstd/manifests/latest")
    assert many.status == 400 and many.error_codes() == ["NAME_INVALID"]


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", None), ("", None), ("1024", 1024), ("500M", 500 << 20), ("2G", 2 << 30),
     ("1.5GiB", 3 << 29), ("64kb", 64 << 10)],
)  # fmt: skip
def test_sizes(text: str, size: int | None) -> None:
    from nixery.config import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["big", "-5M", "M", "1X"])
def test_bad_sizes(text: str) -> None:
    from nixery.config import parse_size
    from nixery.errors import ConfigError

    with pytest.raises(ConfigError):
        parse_size(text)
