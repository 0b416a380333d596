"""Liveness and readiness: can we store things, and can we run Nix?

Each check is a callable that raises on failure. Results are cached for a
few seconds, so a probe storm starts no more than one Nix process per check.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nixery.storage import Storage

CACHE_SECONDS = 5.0
PROBE_DOCUMENT = "health/probe"

Check = Callable[[], str | None]  # raises if unhealthy; may return a detail


@dataclass(frozen=True)
class Result:
    ok: bool
    detail: str | None
    seconds: float
    checked_at: float

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail, "seconds": round(self.seconds, 4)}


def storage_writable(storage: Storage) -> Check:
    """Write, read back and compare a small document."""

    def check() -> str | None:
        token = f"{time.time():.6f}".encode()
        storage.put_document(PROBE_DOCUMENT, token)
        if storage.get_document(PROBE_DOCUMENT) != token:
            raise RuntimeError("a document read back differs from what was written")
        return None

    return check


class Health:
    def __init__(self, checks: Mapping[str, Check], ttl: float = CACHE_SECONDS) -> None:
        self.checks = dict(checks)
        self.ttl = ttl
        self._lock = threading.Lock()
        self._results: dict[str, Result] = {}

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, JSON body) with every check's latest result."""
        with self._lock:  # one prober at a time; the others reuse its results
            results = {name: self._result(name, check) for name, check in self.checks.items()}
        healthy = all(r.ok for r in results.values())
        body = {
            "status": "ok" if healthy else "unavailable",
            "checks": {name: r.to_json() for name, r in results.items()},
        }
        return healthy, body

    def _result(self, name: str, check: Check) -> Result:
        cached = self._results.get(name)
        now = time.monotonic()
        if cached is not None and now - cached.checked_at < self.ttl:
            return cached
        try:
            detail = check()
            ok = True
        except Exception as exc:  # any failure means "not ready"
            detail, ok = f"{type(exc).__name__}: {exc}"[:500], False
        result = Result(ok, detail, time.monotonic() - now, now)
        self._results[name] = result
        return result
