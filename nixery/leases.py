"""One piece of work at a time across processes that share a storage.

`SingleFlight` makes the requests of one process share a build; replicas
sharing a bucket (or processes sharing a directory) coordinate through
leases in that storage (`Storage.acquire_lease`). The process that takes a
key's lease does the work, renewing the lease in the background while it
runs; the others poll for the result, with backoff, for as long as the
lease is live. A holder that dies stops renewing, its lease expires after
`ttl` seconds and a waiter takes it over and does the work itself.

Nothing here decides what is served: the work stores its result with
atomic, content-addressed writes, so a result is either complete or absent,
whoever wrote it, and losing a lease only risks doing the work twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from nixery.storage import Storage, StorageError
from nixery.storage.base import Lease

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TTL = 30.0  # seconds a lease outlives its last renewal
FIRST_POLL = 0.05  # seconds before a waiter first looks for the result again
MAX_POLL = 1.0  # ...doubling up to this


class Leases:
    """The leases this process holds in `storage`, renewed while held."""

    def __init__(self, storage: Storage, ttl: float = DEFAULT_TTL, holder: str | None = None):
        if ttl <= 0:
            raise ValueError("a lease's ttl must be positive")
        self.storage = storage
        self.ttl = ttl
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        # Renewing and releasing one lease must not overlap: a release with
        # the token a renewal just replaced would leave the lease live.
        self._renewing = threading.Lock()
        self._renewer: threading.Thread | None = None

    def run_once(
        self,
        key: str,
        ready: Callable[[], T | None],
        work: Callable[[], T],
        on_wait: Callable[[], None] = lambda: None,
    ) -> T:
        """`ready()` if it has a result; else `work()` under the lease on
        `key`, or, while another process holds that lease, its result.

        `on_wait` is called once if this process waited for another."""
        waited = False
        while True:
            found = ready()
            if found is not None:
                return found
            with self.claim(key) as held:
                if held:
                    found = ready()  # finished just before we took the lease
                    return found if found is not None else work()
            if not waited:
                waited = True
                on_wait()
                log.info("waiting for another replica's work on %s", key)
            found = self.wait(key, ready)
            if found is not None:
                return found

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[bool]:
        """True inside the block if this process holds the lease on `key`
        (renewed until the block ends, then released); False if another
        process holds it."""
        lease = self.storage.acquire_lease(key, self.holder, self.ttl)
        if lease is None:
            yield False
            return
        with self._lock:
            self._held[key] = lease
        self._start_renewer()
        try:
            yield True
        finally:
            with self._renewing:
                with self._lock:
                    current = self._held.pop(key, None)
                if current is not None:
                    try:
                        self.storage.release_lease(current)
                    except StorageError as exc:  # it expires on its own
                        log.warning("releasing the lease on %s failed: %s", key, exc)

    def wait(self, key: str, ready: Callable[[], T | None]) -> T | None:
        """Poll `ready()` while another process's lease on `key` is live;
        its result, or None once the lease is gone or has expired."""
        delay = FIRST_POLL
        while True:
            lease = self.storage.read_lease(key)
            if lease is None or lease.expires <= self.storage.clock():
                if lease is not None and lease.expires > 0:
                    log.warning(
                        "the lease on %s expired: its holder %s stopped renewing it; taking over",
                        key,
                        lease.holder,
                    )
                return ready()
            time.sleep(delay)
            found = ready()
            if found is not None:
                return found
            delay = min(delay * 2, MAX_POLL)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def _start_renewer(self) -> None:
        with self._lock:
            if self._renewer is not None:
                return
            self._renewer = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        # Three renewals per ttl: one failed request does not lose a lease.
        while True:
            time.sleep(self.ttl / 3)
            with self._lock:
                keys = list(self._held)
            for key in keys:
                with self._renewing:
                    self._renew_one(key)

    def _renew_one(self, key: str) -> None:
        with self._lock:
            lease = self._held.get(key)
        if lease is None:
            return  # released meanwhile
        try:
            renewed = self.storage.renew_lease(lease, self.ttl)
        except StorageError as exc:
            log.warning("renewing the lease on %s failed: %s", lease.key, exc)
            return
        with self._lock:
            if renewed is None:
                # Taken over after it expired: the work goes on, and may be
                # done twice, which is harmless.
                log.warning("lost the lease on %s", lease.key)
                del self._held[lease.key]
            else:
                self._held[lease.key] = renewed
