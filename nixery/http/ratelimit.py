"""An optional per-client request rate limit (a token bucket per address).

Clients are told when to come back with `Retry-After`; the buckets of
clients that went quiet are dropped, so memory stays bounded.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from bottle import request

from nixery.errors import ErrorCode, RegistryError

MAX_CLIENTS = 100_000
# Probes and scrapes come from the node or the monitoring host, whose other
# traffic may be throttled; a 429 there would restart a healthy server.
EXEMPT_ROUTES = frozenset({"healthz", "livez", "metrics"})


class TokenBuckets:
    """`rate` requests per second per key, with bursts of up to `burst`."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def take(self, key: str) -> float:
        """Spend one token; return 0, or the seconds to wait when none is left."""
        with self._lock:
            # Read under the lock: a time older than the last refill would take tokens back.
            now = self._clock()
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._remember(key, (tokens - 1, now), now)
                return 0.0
            self._remember(key, (tokens, now), now)
            return (1 - tokens) / self.rate

    def _remember(self, key: str, state: tuple[float, float], now: float) -> None:
        self._buckets[key] = state
        if len(self._buckets) > MAX_CLIENTS:
            # A full bucket is the same as no bucket: forget those.
            refill = self.burst / self.rate
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill}


class RateLimit:
    """Bottle plugin answering 429 TOOMANYREQUESTS beyond the client's rate."""

    name = "nixery-rate-limit"
    api = 2

    def __init__(self, rate: float, burst: int):
        self.buckets = TokenBuckets(rate, burst)

    def apply(self, callback: Callable[..., Any], route: Any) -> Callable[..., Any]:
        if route.name in EXEMPT_ROUTES:
            return callback

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # REMOTE_ADDR, not X-Forwarded-For: clients can forge that header
            # (the server has put a trusted proxy's client in REMOTE_ADDR).
            wait = self.buckets.take(request.environ.get("REMOTE_ADDR", ""))
            if wait > 0:
                raise RegistryError(
                    ErrorCode.TOOMANYREQUESTS,
                    {"reason": "per-client request rate exceeded"},
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
            return callback(*args, **kwargs)

        return wrapper
