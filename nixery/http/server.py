"""Hosting the WSGI app with cheroot.

Slow or idle clients must not pin worker threads: a new connection waits in
cheroot's selector until it sends its first byte (cheroot would hand it to
a worker at once), a request head must arrive in full within
`HEAD_TIMEOUT` seconds, and every socket operation times out after
`SOCKET_TIMEOUT`. With TLS the handshake runs in the worker, not in
cheroot's single accepting thread, where one silent client would stall
every other. A TLS ClientHello sent to the plain port gets cheroot's
`HTTP/1.1 400` answer, which Go clients need to fall back to plain HTTP.

cheroot has no `wsgi.file_wrapper`; the gateway here adds one, so that a
file the app returns (a blob) goes to the socket with sendfile(2): the
kernel copies it from the page cache, with no per-chunk Python work.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, BinaryIO

from cheroot import errors as cheroot_errors
from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from nixery.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_THREADS = 32
# Threads beyond those requests waiting for builds may hold (`--max-waiting`),
# so cached images, blobs and health checks are answered during long builds.
RESERVED_THREADS = 16
SOCKET_TIMEOUT = 30
HEAD_TIMEOUT = 10
LISTEN_BACKLOG = 1024  # cheroot's default of 5 drops bursts of new connections
MAX_HEADER_SIZE = 64 * 1024
MAX_BODY_SIZE = 1024 * 1024  # pull-only: no request needs a body
# What writing to a client that closed its connection raises (TLS: unexpected EOF).
CLIENT_GONE = (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)


class HeadDeadlines:
    """Cuts off connections whose request head takes longer than `limit` seconds."""

    def __init__(self, limit: float):
        self.limit = limit
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="head-deadlines", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, sock: socket.socket) -> Iterator[None]:
        with self._lock:
            self._deadlines[sock] = time.monotonic() + self.limit
        try:
            yield
        finally:
            with self._lock:
                self._deadlines.pop(sock, None)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.limit / 4)):
            now = time.monotonic()
            with self._lock:
                late = [s for s, deadline in self._deadlines.items() if deadline < now]
                for sock in late:
                    del self._deadlines[sock]
            for sock in late:
                try:
                    # The plain socket's shutdown, also for TLS sockets: the
                    # worker blocked reading it gets EOF and closes.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()


class _Request(cheroot_server.HTTPRequest):
    def parse_request(self) -> None:
        with self.server.head_deadlines.watch(self.conn.socket):
            try:
                super().parse_request()
            except ssl.SSLError as exc:
                # A failed (lazy) handshake: answer plain HTTP in plain HTTP,
                # drop anything else quietly.
                if exc.reason == "HTTP_REQUEST":
                    _send_plain(self.conn.socket, PLAIN_HTTP_ON_TLS)
                raise cheroot_errors.FatalSSLAlert(*exc.args) from exc


_PLAIN_BODY = b"This port speaks HTTPS, not HTTP.\n"
PLAIN_HTTP_ON_TLS = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_PLAIN_BODY), _PLAIN_BODY)
)


def _send_plain(sock: socket.socket, data: bytes) -> None:
    try:
        socket.socket.sendall(sock, data)  # around the TLS layer
    except OSError:
        pass


class _Connection(cheroot_server.HTTPConnection):
    RequestHandlerClass = _Request


class Server(wsgi.Server):
    ConnectionClass = _Connection

    def __init__(self, *args: Any, head_timeout: float = HEAD_TIMEOUT, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head_deadlines = HeadDeadlines(head_timeout)

    def process_conn(self, conn: cheroot_server.HTTPConnection) -> None:
        # First sight of a connection: let it wait for data in the selector.
        if not getattr(conn, "nixery_waited", False):
            conn.nixery_waited = True  # type: ignore[attr-defined]
            self._connections.put(conn)  # type: ignore[attr-defined]
            return
        super().process_conn(conn)

    def stop(self) -> None:
        self.head_deadlines.stop()
        super().stop()

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
    runs in a worker thread bounded by the head deadline.
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
        sent = sock.sendfile(fh, fh.tell(), count) if count else 0
        self.remaining_bytes_out = count - sent
        wfile = self.req.conn.wfile
        if hasattr(wfile, "bytes_written"):
            wfile.bytes_written += sent
        if sent != count:
            # The file shrank under us: the client sees a short body.
            self.req.close_connection = True
            raise OSError(f"sent {sent} of {count} bytes")
        return True


def make_server(
    app: Callable[..., Any],
    host: str,
    port: int,
    threads: int = DEFAULT_THREADS,
    tls: tuple[str, str] | None = None,
    head_timeout: float = HEAD_TIMEOUT,
) -> Server:
    server = Server(
        (host, port),
        app,
        numthreads=threads,
        timeout=SOCKET_TIMEOUT,
        shutdown_timeout=5,
        request_queue_size=LISTEN_BACKLOG,
        head_timeout=head_timeout,
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
) -> None:
    """Serve until SIGINT or SIGTERM, then finish the requests (and builds) in progress.

    Raises ConfigError if the TLS files cannot be loaded or the address cannot be bound.
    """
    try:
        server = make_server(app, host, port, threads, tls)
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
