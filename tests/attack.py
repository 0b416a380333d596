"""Tools for tests that attack the real server: raw requests, tool tracing, process scans."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import bcrypt

STORE_PATH = re.compile(r"/nix/store/[0-9a-z]{32}-[A-Za-z0-9+._?=-]+")


@dataclass
class RawReply:
    status: int
    head: str
    body: bytes


def raw_request(
    host: str,
    target: bytes,
    method: bytes = b"GET",
    headers: bytes = b"",
    timeout: float = 120,
    tls: ssl.SSLContext | None = None,
) -> RawReply:
    """Send exactly these bytes as the request target; no client-side checks."""
    name, _, port = host.rpartition(":")
    request = method + b" " + target + b" HTTP/1.1\r\nHost: " + host.encode()
    request += b"\r\nConnection: close\r\n" + headers + b"\r\n"
    with socket.create_connection((name, int(port)), timeout=timeout) as sock:
        conn = tls.wrap_socket(sock, server_hostname=name) if tls else sock
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    match = re.match(r"HTTP/1\.[01] (\d{3})", status_line)
    if not match:
        raise AssertionError(f"no status line in reply: {data[:80]!r}")
    return RawReply(int(match.group(1)), head.decode("latin-1"), body)


# -- tracing the tools the server runs ----------------------------------------

TRACED = ("nix-instantiate", "nix-store", "nix", "git")

WRAPPER = """#!{python}
import json, os, sys
argv = sys.argv[1:]
entry = {{"tool": {tool!r}, "argv": argv}}
if "argsFile" in argv and argv.index("argsFile") + 1 < len(argv):
    try:
        entry["args"] = open(argv[argv.index("argsFile") + 1]).read()
    except OSError as exc:
        entry["args_error"] = str(exc)
with open({log!r}, "a") as fh:
    fh.write(json.dumps(entry) + "\\n")
os.execv({real!r}, [{real!r}] + argv)
"""


def make_tracing_path(directory: Path, log: Path) -> str:
    """A PATH whose first directory logs every call of the traced tools."""
    directory.mkdir(parents=True, exist_ok=True)
    for tool in TRACED:
        real = shutil.which(tool)
        if real is None:
            continue
        script = directory / tool
        script.write_text(
            WRAPPER.format(python="/usr/bin/python3", tool=tool, log=str(log), real=real)
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return f"{directory}:{os.environ['PATH']}"


def read_trace(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


# -- processes ------------------------------------------------------------------


def processes_mentioning(needle: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose argv or environ contains needle."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ")
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        if needle.encode() in cmdline or needle.encode() in environ:
            found.append((int(entry.name), cmdline.decode(errors="replace")))
    return found


def descendants(pid: int) -> list[int]:
    """Live processes whose parent chain leads to pid."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parents.items():
            if parent == current:
                found.append(child)
                frontier.append(child)
    return found


# -- credentials and certificates ------------------------------------------------


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    lines = [
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(5)).decode()}" for u, p in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def self_signed_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


# -- floods of slow connections from one address ----------------------------------

PROBE_ADDRESS = "127.0.0.2"  # the well-behaved client
ATTACK_ADDRESS = "127.0.0.3"  # every attacking connection comes from here


def connect_from(source: str, host: str, timeout: float = 30) -> socket.socket:
    """A TCP connection to host:port from the loopback address `source`."""
    name, _, port = host.rpartition(":")
    return socket.create_connection((name, int(port)), timeout, source_address=(source, 0))


class Prober:
    """`GET /v2/` on a new connection from PROBE_ADDRESS every `interval`
    seconds, in a thread; records how long each answer took (None: none)."""

    def __init__(self, host: str, interval: float = 0.25, path: str = "/v2/",
                 tls: ssl.SSLContext | None = None):  # fmt: skip
        self.host, self.interval, self.path, self.tls = host, interval, path, tls
        self.latencies: list[float | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            started = time.monotonic()
            try:
                with connect_from(PROBE_ADDRESS, self.host, timeout=30) as plain:
                    tls = self.tls
                    sock = tls.wrap_socket(plain, server_hostname="127.0.0.1") if tls else plain
                    sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: x\r\n"
                                 "Connection: close\r\n\r\n".encode())  # fmt: skip
                    ok = sock.recv(64).startswith(b"HTTP/1.1 200 ")
            except OSError:
                ok = False
            self.latencies.append(time.monotonic() - started if ok else None)

    def answered(self) -> list[float]:
        assert self.latencies, "no probe ran"
        assert None not in self.latencies, f"unanswered probes: {self.latencies}"
        return [t for t in self.latencies if t is not None]


@dataclass
class Lifetime:
    opened: float
    closed: float | None = None  # when the server closed it (EOF or reset seen)
    received: int = 0


class SlowClients:
    """`count` connections from ATTACK_ADDRESS, each sending `opening` and
    then, every `interval` seconds, `drip` (if any); a connection the server
    closes is replaced (at most `reconnects` times), and poll(2) notices the
    close at once. Runs until `stop()`, or `limit` seconds at most."""

    def __init__(self, host: str, count: int, opening: bytes, drip: bytes = b"",
                 interval: float = 2.0, reconnects: int = 2000, limit: float = 120,
                 reads: bool = True):  # fmt: skip
        self.reads = reads  # False: never read a byte of the answer
        self.host, self.count, self.opening, self.drip = host, count, opening, drip
        self.interval, self.reconnects, self.limit = interval, reconnects, limit
        self.lifetimes: list[Lifetime] = []
        self.failed_connects = 0
        self._open: dict[int, tuple[socket.socket, Lifetime]] = {}
        self._poll = select.poll()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SlowClients:
        for _ in range(self.count):
            self._connect()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        for sock, _ in self._open.values():
            sock.close()
        self._open.clear()

    def _connect(self) -> None:
        if len(self.lifetimes) >= self.count + self.reconnects:
            return
        try:
            sock = connect_from(ATTACK_ADDRESS, self.host, timeout=5)
            if not self.reads:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(self.opening)
        except OSError:
            self.failed_connects += 1
            return
        sock.setblocking(False)
        life = Lifetime(time.monotonic())
        self.lifetimes.append(life)
        self._open[sock.fileno()] = (sock, life)
        # A client that does not read must still see a reset or a hang-up.
        events = select.POLLRDHUP | (select.POLLIN if self.reads else 0)
        self._poll.register(sock, events)

    def _closed(self, fd: int) -> None:
        sock, life = self._open.pop(fd)
        life.closed = time.monotonic()
        self._poll.unregister(fd)
        sock.close()
        if not self._stop.is_set():
            self._connect()

    def _run(self) -> None:
        ends = time.monotonic() + self.limit
        next_drip = time.monotonic() + self.interval
        while not self._stop.is_set() and time.monotonic() < ends:
            for fd, event in self._poll.poll(50):
                if fd not in self._open:
                    continue
                if event & (select.POLLHUP | select.POLLERR | select.POLLRDHUP):
                    self._closed(fd)
                    continue
                sock, life = self._open[fd]
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    life.received += len(data)
                else:
                    self._closed(fd)
            if self.drip and time.monotonic() >= next_drip:
                next_drip += self.interval
                for fd, (sock, _) in list(self._open.items()):
                    try:
                        sock.send(self.drip)
                    except OSError:
                        self._closed(fd)

    def still_open(self) -> int:
        return len(self._open)
