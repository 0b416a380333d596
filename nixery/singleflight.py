"""Run a computation once per key while others asking for it wait."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, Future[T]] = {}

    def do(self, key: Hashable, fn: Callable[[], T]) -> T:
        """Run `fn` unless a call for `key` is in flight; share its outcome."""
        with self._lock:
            future = self._calls.get(key)
            leader = future is None
            if future is None:
                future = Future()
                self._calls[key] = future
        if leader:
            try:
                future.set_result(fn())
            except BaseException as exc:  # waiters must see every outcome
                future.set_exception(exc)
            finally:
                with self._lock:
                    del self._calls[key]
        return future.result()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._calls)
