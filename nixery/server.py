"""Hosting the WSGI app with cheroot.

cheroot has no `wsgi.file_wrapper`; the gateway here adds one, so that a
file the app returns (a blob) goes to the socket with sendfile(2): the
kernel copies it from the page cache, with no per-chunk Python work.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, BinaryIO

from cheroot import wsgi

log = logging.getLogger(__name__)

DEFAULT_THREADS = 32
FILE_CHUNK = 1 << 20  # without sendfile: few, large reads


class FileWrapper:
    """`wsgi.file_wrapper`: a file to send from its current position."""

    def __init__(self, fh: BinaryIO, block_size: int = FILE_CHUNK):
        self.fh = fh
        self.block_size = max(block_size, FILE_CHUNK)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.fh.read(self.block_size):
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
            if not (isinstance(response, FileWrapper) and self._sendfile(response.fh)):
                for chunk in response:
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
    app: Callable[..., Any], host: str, port: int, threads: int = DEFAULT_THREADS
) -> wsgi.Server:
    # Slow or idle clients must not pin worker threads forever.
    server = wsgi.Server((host, port), app, numthreads=threads, timeout=60, shutdown_timeout=5)
    server.gateway = _Gateway
    server.max_request_header_size = 64 * 1024
    server.max_request_body_size = 1024 * 1024
    return server


def serve(app: Callable[..., Any], host: str, port: int, threads: int = DEFAULT_THREADS) -> None:
    """Serve until SIGINT or SIGTERM."""
    server = make_server(app, host, port, threads)

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.prepare()
    log.info("serving on http://%s:%d", host, server.bind_addr[1])
    server.serve()
