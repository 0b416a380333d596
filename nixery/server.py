"""Hosting the WSGI app with cheroot."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from cheroot import wsgi

log = logging.getLogger(__name__)

DEFAULT_THREADS = 32


def make_server(
    app: Callable[..., Any], host: str, port: int, threads: int = DEFAULT_THREADS
) -> wsgi.Server:
    # Slow or idle clients must not pin worker threads forever.
    server = wsgi.Server((host, port), app, numthreads=threads, timeout=60, shutdown_timeout=5)
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
