"""A tiny HTTP helper for protocol tests (no redirects, no exceptions on 4xx)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def require_header(self, name: str) -> str:
        value = self.headers.get(name)
        assert value is not None, f"no {name} header"
        return value

    def error_codes(self) -> list[str]:
        return [e["code"] for e in self.json()["errors"]]


Headers = dict[str, str] | list[tuple[str, str]]


def call(
    host: str, method: str, path: str, headers: Headers | None = None, timeout: float = 120
) -> Reply:
    """One request; a list of header pairs may repeat a name (sent as separate lines)."""
    conn = http.client.HTTPConnection(host, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        pairs = headers.items() if isinstance(headers, dict) else headers or []
        for name, value in pairs:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def raw_status_line(host: str, payload: bytes, timeout: float = 60) -> bytes:
    """Send raw bytes to `host` and return the first line of the answer."""
    import socket

    address, port = host.rsplit(":", 1)
    with socket.create_connection((address, int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0]
