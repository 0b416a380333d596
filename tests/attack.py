"""Tools for tests that attack the real server: raw requests, tool tracing, process scans."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
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
