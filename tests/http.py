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

    def error_codes(self) -> list[str]:
        return [e["code"] for e in self.json()["errors"]]


def call(
    host: str, method: str, path: str, headers: dict[str, str] | None = None, timeout: float = 120
) -> Reply:
    conn = http.client.HTTPConnection(host, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()
