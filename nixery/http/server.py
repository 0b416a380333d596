"""Hosting the WSGI app with cheroot, so that no client can hold its workers.

A connection goes through three stages:

1. Intake, in cheroot's selector thread, without a worker: whatever the
   socket has is read without blocking until the whole request (head, and
   the small body a few routes take) is there. A new connection has
   `head_timeout` seconds for that, TLS handshake included; a kept-alive one
   may wait `idle_timeout` seconds for its next request, which then has
   `head_timeout` seconds from its first byte. A trickle of bytes does not
   reset these deadlines. Idle connections cost a file descriptor, nothing more.
2. Dispatch: a complete request goes to a worker thread, unless its client
   address already has `active_per_address` requests in workers; then it
   waits, still without a worker, until one of them ends. One address can
   hold a share of the pool, never all of it.
3. The worker runs the app and writes the response under a progress
   deadline: each `SEND_STEP` bytes (or the rest) must be accepted by the
   socket within `send_timeout` seconds, or the connection is closed.

Per address at most `per_address` connections are open; more are answered
`429` and closed. Connections from `trusted_proxies` are not counted, and
their requests take the client address from `X-Forwarded-For`.

With TLS the handshake happens in the intake stage too, in non-blocking
steps. A TLS ClientHello sent to the plain port gets cheroot's
`HTTP/1.1 400` answer, which Go clients need to fall back to plain HTTP.

cheroot has no `wsgi.file_wrapper`; the gateway here adds one, so that a
file the app returns (a blob) goes to the socket with sendfile(2): the
kernel copies it from the page cache, with no per-chunk Python work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import selectors
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from _pyio import BufferedReader  # cheroot's readers are _pyio ones
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any, BinaryIO, Protocol

from cheroot import connections as cheroot_connections
from cheroot import errors as cheroot_errors
from cheroot import makefile as cheroot_makefile
from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from nixery.config import ConnectionLimits
from nixery.errors import ConfigError
from nixery.http.admission import (
    MAX_BODY_SIZE,
    MAX_HEADER_SIZE,
    UNSHARED_PATHS,
    AddressCounts,
    FairDispatch,
    forwarded_client,
    in_networks,
    is_tls_hello,
    leading_blank_lines,
    request_path,
    request_size,
)

log = logging.getLogger(__name__)

DEFAULT_THREADS = 32
# Threads beyond those requests waiting for builds may hold (`--max-waiting`),
# so cached images, blobs and health checks are answered during long builds.
RESERVED_THREADS = 16
SOCKET_TIMEOUT = 30  # a worker's blocking reads (there are none left but odd bodies)
LISTEN_BACKLOG = 1024  # cheroot's default of 5 drops bursts of new connections
SEND_STEP = 64 * 1024  # progress a client must make per send_timeout
READ_CHUNK = 64 * 1024
# What writing to a client that closed its connection raises (TLS: unexpected EOF).
CLIENT_GONE = (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)

# Reasons a connection is closed by the server, as counted in metrics.
TOO_MANY_CONNECTIONS = "too_many_connections"
HEAD_TIMEOUT = "head_timeout"
IDLE_TIMEOUT = "idle_timeout"
SEND_TIMEOUT = "send_timeout"

_REFUSAL_BODY = (
    b'{"errors":[{"code":"TOOMANYREQUESTS","message":"too many connections from this address",'
    b'"detail":{}}]}\n'
)
TOO_MANY = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)
# Go clients fall back to plain HTTP on this answer to their ClientHello.
_TLS_BODY = b"This port speaks HTTP, not HTTPS.\n"
TLS_ON_PLAIN_HTTP = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_TLS_BODY), _TLS_BODY)
)
_PLAIN_BODY = b"This port speaks HTTPS, not HTTP.\n"
PLAIN_HTTP_ON_TLS = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_PLAIN_BODY), _PLAIN_BODY)
)


class ConnectionEvents(Protocol):
    """What hosting reports (to metrics)."""

    def connection_closed(self, reason: str) -> None: ...

    def track_connections(self, open_: Callable[[], int], waiting: Callable[[], int]) -> None: ...


class _NoEvents:
    def connection_closed(self, reason: str) -> None:
        pass

    def track_connections(self, open_: Callable[[], int], waiting: Callable[[], int]) -> None:
        pass


def _send_plain(sock: socket.socket, data: bytes) -> None:
    """Best effort, never blocking: a short answer before closing."""
    try:
        socket.socket.send(sock, data, socket.MSG_DONTWAIT)  # around the TLS layer
    except OSError:
        pass


class SendStalled(TimeoutError):
    """The client accepted too little of a response in time."""


class _Pace:
    """The progress deadline of one connection's writes.

    A step is SEND_STEP bytes or one write the socket takes whole; each has
    `timeout` seconds. Time the app spends between writes is not charged.
    """

    def __init__(self, timeout: float, on_stall: Callable[[], None]):
        self.timeout = timeout
        self._on_stall = on_stall
        self._deadline = 0.0
        self._left = 0

    def remaining(self) -> float:
        """Seconds left for the current step (a new one starts if none runs)."""
        now = time.monotonic()
        if self._left <= 0:
            self._left, self._deadline = SEND_STEP, now + self.timeout
        left = self._deadline - now
        if left <= 0:
            self._on_stall()
            raise SendStalled("timed out")
        return left

    def accepted(self, count: int, whole: bool) -> None:
        self._left = 0 if whole else self._left - count

    def stalled(self) -> None:
        self._on_stall()
        raise SendStalled("timed out")


class _RequestReader(socket.SocketIO):
    """Reads what the intake stage buffered first, then the socket."""

    def __init__(self, sock: socket.socket):
        super().__init__(sock, "rb")
        self.pending = memoryview(b"")

    def readinto(self, b: Any) -> int | None:
        if self.pending:
            n = min(len(b), len(self.pending))
            b[:n] = self.pending[:n]
            self.pending = self.pending[n:]
            return n
        return super().readinto(b)


class _PacedWriter(socket.SocketIO):
    def __init__(self, sock: socket.socket, pace: _Pace, timeout: float):
        super().__init__(sock, "wb")
        self.pace = pace
        self.timeout = timeout

    def write(self, b: Any) -> int | None:
        view = memoryview(b)[:SEND_STEP]
        sock = self._sock  # type: ignore[attr-defined]
        sock.settimeout(self.pace.remaining())
        try:
            sent = sock.send(view)
        except TimeoutError:
            self.pace.stalled()
        finally:
            sock.settimeout(self.timeout)
        self.pace.accepted(sent, sent == len(view))
        return int(sent)


class _Reader(cheroot_makefile.StreamReader):
    def __init__(self, raw: _RequestReader):
        BufferedReader.__init__(self, raw, READ_CHUNK)
        self.bytes_read = 0


class _Writer(cheroot_makefile.StreamWriter):
    def __init__(self, raw: _PacedWriter):
        cheroot_makefile.BufferedWriter.__init__(self, raw, READ_CHUNK)
        self.bytes_written = 0


class _Request(cheroot_server.HTTPRequest):
    def parse_request(self) -> None:
        try:
            super().parse_request()
        except ssl.SSLError as exc:
            raise cheroot_errors.FatalSSLAlert(*exc.args) from exc


# Intake states of a connection: waiting for (the rest of) a request, idle
# between requests, or with a worker (or waiting for one).
_READING, _IDLE, _BUSY = "reading", "idle", "busy"


class _Connection(cheroot_server.HTTPConnection):
    RequestHandlerClass = _Request
    server: Server

    def __init__(self, server: Server, sock: socket.socket, makefile: Any = None):
        super().__init__(server, sock)
        self.rfile.close()
        self.pace = _Pace(server.limits.send_timeout, self._stalled)
        self.reader = _RequestReader(sock)
        self.rfile = _Reader(self.reader)
        self.wfile = _Writer(_PacedWriter(sock, self.pace, server.timeout))
        self.state = ""  # not yet admitted
        self.deadline = time.monotonic() + server.limits.head_timeout
        self.received = bytearray()
        self.client = ""  # the address this request is accounted to
        self.share: str | None = None  # whose share of the workers it takes
        self.counted = False

    def _stalled(self) -> None:
        self.server.events.connection_closed(SEND_TIMEOUT)
        # Reset, not close: what the client left unread would otherwise stay
        # in the kernel (megabytes of a blob) until TCP gives up on it.
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def communicate(self) -> bool:
        try:
            return bool(super().communicate())
        finally:
            self.server.dispatch.done(self.share)

    def close(self) -> None:
        if self.counted:
            self.counted = False
            self.server.connection_counts.remove(self.remote_addr or "")
        super().close()


class _Connections(cheroot_connections.ConnectionManager):
    """cheroot's selector loop, with each connection's own deadline."""

    server: Server

    def put(self, conn: _Connection) -> None:
        """A worker is done with `conn`, which stays open for another request."""
        conn.last_used = time.time()
        conn.state = _IDLE
        conn.deadline = time.monotonic() + self.server.limits.idle_timeout
        self.server.process_conn(conn)

    def watch(self, conn: _Connection) -> None:
        self._selector.register(conn.socket.fileno(), selectors.EVENT_READ, data=conn)  # type: ignore[attr-defined]

    def _expire(self, threshold: float) -> None:
        now = time.monotonic()
        late = [
            (fd, conn)
            for fd, conn in self._selector.connections  # type: ignore[attr-defined]
            if conn is not self.server and conn.deadline < now
        ]
        for fd, conn in late:
            self._selector.unregister(fd)  # type: ignore[attr-defined]
            self.server.events.connection_closed(
                IDLE_TIMEOUT if conn.state == _IDLE else HEAD_TIMEOUT
            )
            conn.close()


class Server(wsgi.Server):
    ConnectionClass = _Connection

    def __init__(
        self,
        *args: Any,
        limits: ConnectionLimits | None = None,
        events: ConnectionEvents | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.limits = limits or ConnectionLimits()
        self.events: ConnectionEvents = events or _NoEvents()
        self.connection_counts = AddressCounts(self.limits.per_address)
        self.dispatch: FairDispatch[_Connection] = FairDispatch(
            self.limits.active_per_address, self._to_worker
        )
        # Idle connections cost no worker: keep-alive for all of them.
        self.keep_alive_conn_limit = None  # type: ignore[assignment]
        self.events.track_connections(self.connection_counts.total, self.dispatch.waiting)

    def prepare(self) -> None:
        super().prepare()
        plain = self._connections  # type: ignore[has-type]
        self._connections = _Connections(self)
        plain._selector.close()

    def _to_worker(self, conn: _Connection) -> None:
        super().process_conn(conn)

    def process_conn(self, conn: _Connection) -> None:  # type: ignore[override]
        """Intake: read what `conn` has; dispatch it once a request is complete.

        Runs in the selector thread (new and readable connections) or in a
        worker that kept `conn` open; never blocks."""
        if not conn.state:
            if not self._admit(conn):
                return
            conn.state = _READING
        if conn.rfile.has_data():  # pipelined: read ahead by the worker's buffer
            conn.received += conn.rfile.read1(1 << 30)
        if not self._receive(conn):
            conn.close()
            return
        del conn.received[: leading_blank_lines(conn.received)]
        if self.ssl_adapter is None and is_tls_hello(conn.received):
            _send_plain(conn.socket, TLS_ON_PLAIN_HTTP)
            conn.close()
            return
        if conn.received and conn.state == _IDLE:
            # The next request's first bytes: from now on its own deadline.
            conn.state = _READING
            conn.deadline = time.monotonic() + self.limits.head_timeout
        if not conn.received or request_size(conn.received) is None:
            self._connections.watch(conn)
            return
        self._hand_over(conn)

    def _admit(self, conn: _Connection) -> bool:
        peer = conn.remote_addr or ""
        if self.connection_counts.add(peer, exempt=self._trusted(peer)):
            conn.counted = True
            return True
        self.events.connection_closed(TOO_MANY_CONNECTIONS)
        if self.ssl_adapter is None:
            _send_plain(conn.socket, TOO_MANY)
        conn.close()
        return False

    def _trusted(self, peer: str) -> bool:
        return in_networks(peer, self.limits.trusted_proxies)

    def _receive(self, conn: _Connection) -> bool:
        """Read without blocking until a request is complete or nothing is
        left to read; False when the connection is over (EOF, errors)."""
        sock = conn.socket
        try:
            sock.settimeout(0)
            while request_size(conn.received) is None:
                chunk = sock.recv(READ_CHUNK)
                if not chunk:
                    return False
                conn.received += chunk
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLError as exc:
            if exc.reason == "HTTP_REQUEST":  # plain HTTP on the TLS port
                _send_plain(sock, PLAIN_HTTP_ON_TLS)
            return False
        except OSError:
            return False
        try:
            sock.settimeout(self.timeout)
        except OSError:
            return False
        return True

    def _hand_over(self, conn: _Connection) -> None:
        data = bytes(conn.received)
        conn.received = bytearray()
        conn.reader.pending = memoryview(data)
        conn.state = _BUSY
        peer = conn.remote_addr or ""
        trusted = self._trusted(peer)
        conn.client = forwarded_client(data, peer, self.limits.trusted_proxies) if trusted else peer
        conn.share = None if request_path(data) in UNSHARED_PATHS else conn.client
        self.dispatch.put(conn.share, conn)

    def stop(self) -> None:
        super().stop()
        for conn in self.dispatch.drain():
            conn.close()

    def error_log(self, msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
        # cheroot writes these to stderr itself, which would break one-line
        # (JSON) logs; a client that hung up mid-response is no server error.
        if isinstance(sys.exc_info()[1], CLIENT_GONE):
            log.debug("client went away: %s", msg)
            return
        log.log(level, "%s", msg, exc_info=traceback)


class LazyHandshakeSSLAdapter(BuiltinSSLAdapter):
    """cheroot's builtin adapter, with the handshake moved to the first read.

    OpenSSL completes a server-side handshake inside the first read, which
    the intake stage makes without blocking.
    """

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict[str, str]]:
        wrapped = self.context.wrap_socket(sock, do_handshake_on_connect=False, server_side=True)
        return wrapped, {"wsgi.url_scheme": "https", "HTTPS": "on"}


FILE_CHUNK = 1 << 20  # without sendfile: few, large reads


class FileWrapper:
    """`wsgi.file_wrapper`: a file to send from its current position."""

    def __init__(self, fh: BinaryIO, block_size: int = FILE_CHUNK):
        self.fh = fh
        self.block_size = max(block_size, FILE_CHUNK)

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks(None)

    def chunks(self, limit: int | None) -> Iterator[bytes]:
        """The file from its position, up to `limit` bytes if one is given."""
        while limit is None or limit > 0:
            chunk = self.fh.read(self.block_size if limit is None else min(self.block_size, limit))
            if not chunk:
                return
            if limit is not None:
                limit -= len(chunk)
            yield chunk

    def close(self) -> None:
        self.fh.close()


class _Gateway(wsgi.Gateway_10):
    """WSGI 1.0 with a file wrapper that is sent with sendfile(2)."""

    def get_environ(self) -> dict[str, Any]:  # type: ignore[override]
        env: dict[str, Any] = super().get_environ()
        env["wsgi.file_wrapper"] = FileWrapper
        client = getattr(self.req.conn, "client", "")
        if client:  # a trusted proxy's client, or the peer itself
            env["REMOTE_ADDR"] = client
        return env

    def respond(self) -> None:
        response = self.req.server.wsgi_app(self.env, self.start_response)
        try:
            chunks: Iterable[bytes] = response
            if isinstance(response, FileWrapper):
                # Without sendfile, stop at Content-Length: a range may end
                # before the file does.
                sent = self._sendfile(response.fh)
                chunks = () if sent else response.chunks(self.remaining_bytes_out)
            for chunk in chunks:
                if chunk:
                    self.write(chunk)
        finally:
            self.req.ensure_headers_sent()
            if hasattr(response, "close"):
                response.close()

    def _sendfile(self, fh: BinaryIO) -> bool:
        """Send Content-Length bytes of `fh` from its position; False if this
        connection cannot (TLS, no length, HEAD), then the caller iterates."""
        sock = self.req.conn.socket
        count = self.remaining_bytes_out
        if (
            count is None
            or self.req.method == b"HEAD"
            or self.req.chunked_write
            or isinstance(sock, ssl.SSLSocket)
            or not isinstance(sock, socket.socket)
        ):
            return False
        try:
            fh.fileno()
        except (AttributeError, OSError, ValueError):
            return False
        self.req.ensure_headers_sent()
        self.req.conn.wfile.flush()
        sent = _paced_sendfile(sock, fh, count, self.req.conn.pace) if count else 0
        self.remaining_bytes_out = count - sent
        wfile = self.req.conn.wfile
        if hasattr(wfile, "bytes_written"):
            wfile.bytes_written += sent
        if sent != count:
            # The file shrank under us: the client sees a short body.
            self.req.close_connection = True
            raise OSError(f"sent {sent} of {count} bytes")
        return True


def _paced_sendfile(sock: socket.socket, fh: BinaryIO, count: int, pace: _Pace) -> int:
    """Up to `count` bytes of `fh` from its position with sendfile(2), under
    the progress deadline; the bytes sent (fewer if the file ends first)."""
    out, offset = sock.fileno(), fh.tell()
    poller = select.poll()
    poller.register(out, select.POLLOUT)
    sent = 0
    while sent < count:
        # Wait for room first, as socket.sendfile does: the kernel reports it
        # once a good part of the buffer is free, so each call sends much.
        if not poller.poll(pace.remaining() * 1000):
            pace.stalled()
        want = min(count - sent, 1 << 30)
        try:
            # The socket is non-blocking (it has a timeout): this never waits.
            n = os.sendfile(out, fh.fileno(), offset + sent, want)
        except BlockingIOError:
            continue
        if n == 0:
            break
        sent += n
        pace.accepted(n, whole=n == want)
    fh.seek(offset + sent)
    return sent


def make_server(
    app: Callable[..., Any],
    host: str,
    port: int,
    threads: int = DEFAULT_THREADS,
    tls: tuple[str, str] | None = None,
    limits: ConnectionLimits | None = None,
    events: ConnectionEvents | None = None,
) -> Server:
    server = Server(
        (host, port),
        app,
        numthreads=threads,
        timeout=SOCKET_TIMEOUT,
        shutdown_timeout=5,
        request_queue_size=LISTEN_BACKLOG,
        limits=limits,
        events=events,
    )
    server.gateway = _Gateway
    server.max_request_header_size = MAX_HEADER_SIZE
    server.max_request_body_size = MAX_BODY_SIZE
    if tls is not None:
        server.ssl_adapter = LazyHandshakeSSLAdapter(*tls)
    return server


def serve(
    app: Callable[..., Any],
    host: str,
    port: int,
    threads: int = DEFAULT_THREADS,
    tls: tuple[str, str] | None = None,
    limits: ConnectionLimits | None = None,
    events: ConnectionEvents | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then finish the requests (and builds) in progress.

    Raises ConfigError if the TLS files cannot be loaded or the address cannot be bound.
    """
    try:
        server = make_server(app, host, port, threads, tls, limits, events)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        files = f" {tls[0]} and key {tls[1]}" if tls else ""
        raise ConfigError(f"cannot load TLS certificate{files}: {exc}") from exc
    try:
        server.prepare()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    stopping: list[threading.Thread] = []

    def stop_server() -> None:
        log.info("stopping: no new connections; finishing requests and builds in progress")
        server.stop()

    def stop(signum: int, frame: FrameType | None) -> None:
        if not stopping:
            stopping.append(threading.Thread(target=stop_server, name="stop", daemon=True))
            stopping[0].start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    scheme = "https" if tls else "http"
    log.info("serving on %s://%s:%d", scheme, host, server.bind_addr[1])
    server.serve()
    # Builds run in pools that refuse work once the interpreter shuts down:
    # returning before they end would fail them half-way.
    for thread in stopping:
        thread.join()
    log.info("stopped")
