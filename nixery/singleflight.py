"""Run a computation once per key while others asking for it wait.

Without workers, the first caller runs the computation on its own thread.
With workers, computations run on a pool of that many threads and callers
only wait for the outcome: a caller that goes away cancels nothing, the
others still get the result, and the work runs to its end (so whatever it
caches is there for a retry). At most `max_waiting`
keys may wait for a free worker; beyond that a new key is refused with
`QueueFull` rather than piling up unbounded work.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Generic, TypeVar

from nixery.errors import QueueFull

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self, workers: int | None = None, max_waiting: int = 0, name: str = "flight"):
        if workers is not None and workers < 1:
            raise ValueError("workers must be at least 1")
        if max_waiting < 0:
            raise ValueError("max_waiting must not be negative")
        self._lock = threading.Lock()
        self._calls: dict[Hashable, Future[T]] = {}
        self._running = 0
        self.workers = workers
        self.max_waiting = max_waiting
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name) if workers else None

    def do(self, key: Hashable, fn: Callable[[], T]) -> T:
        """Run `fn` unless a call for `key` is in flight; share its outcome."""
        return self.submit(key, fn).result()

    def submit(self, key: Hashable, fn: Callable[[], T]) -> Future[T]:
        """The future of the call for `key`, starting one with `fn` if none is in flight."""
        with self._lock:
            future = self._calls.get(key)
            if future is not None:
                return future
            future = Future()
            if self._pool is not None:
                assert self.workers is not None
                if len(self._calls) >= self.workers + self.max_waiting:
                    raise QueueFull(self._running, len(self._calls) - self._running)
                # The call runs in the starting caller's context (e.g. its log fields).
                self._pool.submit(contextvars.copy_context().run, self._run, key, fn, future)
            self._calls[key] = future
        if self._pool is None:  # inline: this caller leads
            self._run(key, fn, future)
        return future

    def _run(self, key: Hashable, fn: Callable[[], T], future: Future[T]) -> None:
        with self._lock:
            self._running += 1
        try:
            result = fn()
        except BaseException as exc:  # waiters must see every outcome
            self._forget(key)
            future.set_exception(exc)
        else:
            self._forget(key)
            future.set_result(result)

    def _forget(self, key: Hashable) -> None:
        # Before the outcome is published, so that whoever sees it also sees
        # the slot free; a caller in between starts a new call.
        with self._lock:
            self._running -= 1
            del self._calls[key]

    def in_flight(self) -> int:
        with self._lock:
            return len(self._calls)

    def counts(self) -> tuple[int, int]:
        """(running, waiting for a worker)."""
        with self._lock:
            return self._running, len(self._calls) - self._running


class Count:
    """A thread-safe count of callers inside a block."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self, limit: int | None = None) -> bool:
        """Count one more caller, unless `limit` callers are already inside."""
        with self._lock:
            if limit is not None and self.value >= limit:
                return False
            self.value += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.value -= 1
