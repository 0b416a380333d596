"""Who gets a connection and a worker thread: the parts of hosting that do
not touch sockets (request framing, client addresses, per-address counts).

See `nixery.http.server` for how the server uses them.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from nixery.config import Network

T = TypeVar("T")

MAX_HEADER_SIZE = 64 * 1024
MAX_BODY_SIZE = 1024 * 1024  # pull-only: no request needs a body
# Bodies read before a worker is assigned (a login form); larger ones are
# read by the worker, so that waiting connections hold little memory.
INTAKE_BODY_SIZE = 16 * 1024

_CONTENT_LENGTH = re.compile(rb"\r?\nContent-Length[ \t]*:[ \t]*(\d{1,12})[ \t]*\r?\n", re.I)
_CHUNKED = re.compile(rb"\r?\nTransfer-Encoding[ \t]*:", re.I)
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/\d\.\d\r\n")
_EXPECT = re.compile(rb"\r?\nExpect[ \t]*:", re.I)
_FORWARDED_FOR = re.compile(rb"\r?\nX-Forwarded-For[ \t]*:([^\r\n]*)", re.I)


def in_networks(address: str, networks: tuple[Network, ...]) -> bool:
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def leading_blank_lines(data: bytes | bytearray) -> int:
    """Bytes of empty lines before a request line (RFC 9112 2.2: to be ignored)."""
    stripped = bytes(data).lstrip(b"\r\n")
    return len(data) - len(stripped)


def request_size(data: bytes | bytearray) -> int | None:
    """The bytes of the first request in `data` (head and body) once all of it
    is there, else None. Anything odd (oversized, chunked, malformed) counts as
    complete: the worker then answers it with an error without waiting."""
    line_end = data.find(b"\n")
    if line_end != -1 and not _REQUEST_LINE.fullmatch(data, 0, line_end + 1):
        return len(data)  # not HTTP/1: the worker answers 400
    end = data.find(b"\r\n\r\n")
    sep = 4
    bare = data.find(b"\n\n")
    if bare != -1 and (end == -1 or bare < end):
        end, sep = bare, 2  # malformed (cheroot requires CRLF); the worker says 400
    if end == -1:
        return len(data) if len(data) > MAX_HEADER_SIZE else None
    head = bytes(data[: end + sep])
    if _CHUNKED.search(head) or _EXPECT.search(head):
        return len(head)  # the worker reads the body (after its 100 Continue)
    match = _CONTENT_LENGTH.search(head)
    body = int(match.group(1)) if match else 0
    if body > INTAKE_BODY_SIZE:
        return len(head)  # the worker refuses it (413) or reads it itself
    total = len(head) + body
    return total if len(data) >= total else None


# Probes and scrapes: quick, and the kubelet's share may be busy with pulls.
UNSHARED_PATHS = frozenset({b"/healthz", b"/livez", b"/metrics"})


def request_path(data: bytes) -> bytes:
    """The path of the request line at the start of `data` (no query)."""
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""


def is_tls_hello(data: bytes | bytearray) -> bool:
    """A TLS handshake record (a client speaking HTTPS to a plain HTTP port)."""
    return data[:2] == b"\x16\x03"


def forwarded_client(head: bytes, peer: str, proxies: tuple[Network, ...]) -> str:
    """The client address a trusted proxy passed in X-Forwarded-For: the last
    address that is not one of the proxies (addresses further left are the
    client's own claims). `peer` when the header is missing or invalid."""
    values = [m.group(1).decode("latin-1") for m in _FORWARDED_FOR.finditer(head)]
    hops = [h.strip() for h in ",".join(values).split(",") if h.strip()]
    client = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break
        client = hop
        if not in_networks(hop, proxies):
            break
    return client


class AddressCounts:
    """Open connections per client address, refused beyond `limit` (0: no limit)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._total = 0

    def add(self, address: str, exempt: bool = False) -> bool:
        with self._lock:
            count = self._counts.get(address, 0)
            if self.limit and not exempt and count >= self.limit:
                return False
            self._counts[address] = count + 1
            self._total += 1
            return True

    def remove(self, address: str) -> None:
        with self._lock:
            count = self._counts.get(address, 0) - 1
            if count > 0:
                self._counts[address] = count
            else:
                self._counts.pop(address, None)
            self._total -= 1

    def total(self) -> int:
        return self._total


class FairDispatch(Generic[T]):
    """Hands work to `submit`, at most `share` items per key at once (0: no
    limit); the rest wait in order, holding nothing but memory, until an item
    of the same key is done."""

    def __init__(self, share: int, submit: Callable[[T], None]):
        self.share = share
        self._submit = submit
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}
        self._waiting: dict[str, deque[T]] = {}
        self._waiting_count = 0

    def put(self, key: str | None, item: T) -> None:
        """Submit `item` now or when `key` has room; a None key is never held."""
        if key is None:
            self._submit(item)
            return
        with self._lock:
            active = self._active.get(key, 0)
            if self.share and active >= self.share:
                self._waiting.setdefault(key, deque()).append(item)
                self._waiting_count += 1
                return
            self._active[key] = active + 1
        self._submit(item)

    def done(self, key: str | None) -> None:
        """One item of `key` ended: the next waiting one of `key` takes its place."""
        if key is None:
            return
        with self._lock:
            queue = self._waiting.get(key)
            if not queue:
                active = self._active.get(key, 0) - 1
                if active > 0:
                    self._active[key] = active
                else:
                    self._active.pop(key, None)
                return
            item = queue.popleft()
            self._waiting_count -= 1
            if not queue:
                del self._waiting[key]
        self._submit(item)

    def drain(self) -> list[T]:
        """Everything still waiting (at shutdown)."""
        with self._lock:
            items = [item for queue in self._waiting.values() for item in queue]
            self._waiting.clear()
            self._waiting_count = 0
        return items

    def waiting(self) -> int:
        return self._waiting_count
