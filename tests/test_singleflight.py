"""SingleFlight with real threads: one call per key, a bounded queue, and
outcomes that do not depend on who is still waiting."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from nixery.errors import QueueFull
from nixery.singleflight import SingleFlight

WAIT = 30  # seconds; only reached if something hangs


def test_concurrent_callers_of_one_key_share_one_call() -> None:
    flight: SingleFlight[int] = SingleFlight(workers=2, max_waiting=0)
    release = threading.Event()
    calls = []
    joined: list[Future[int]] = []

    def work() -> int:
        calls.append(1)
        assert release.wait(WAIT)
        return 42

    def caller() -> int:
        future = flight.submit("image", work)
        joined.append(future)
        return future.result(WAIT)

    with ThreadPoolExecutor(32) as pool:
        results = [pool.submit(caller) for _ in range(32)]
        deadline = time.monotonic() + WAIT
        while len(joined) < 32 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()  # only once every caller holds the call's future
        assert [r.result(WAIT) for r in results] == [42] * 32
    assert len(calls) == 1
    assert len({id(f) for f in joined}) == 1
    assert flight.in_flight() == 0


def test_errors_reach_every_waiter_and_the_key_can_run_again() -> None:
    flight: SingleFlight[int] = SingleFlight()

    def fail() -> int:
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        flight.do("k", fail)
    assert flight.do("k", lambda: 7) == 7


def test_beyond_workers_and_queue_new_keys_are_refused() -> None:
    flight: SingleFlight[str] = SingleFlight(workers=1, max_waiting=1)
    release = threading.Event()
    started = threading.Event()

    def work(name: str) -> str:
        started.set()
        assert release.wait(WAIT)
        return name

    running = flight.submit("a", lambda: work("a"))
    assert started.wait(WAIT)
    waiting = flight.submit("b", lambda: work("b"))
    assert flight.counts() == (1, 1)
    with pytest.raises(QueueFull) as err:
        flight.submit("c", lambda: work("c"))
    assert (err.value.running, err.value.waiting) == (1, 1)
    # Joining a key already in flight is always allowed.
    assert flight.submit("a", lambda: work("x")) is running
    release.set()
    assert (running.result(WAIT), waiting.result(WAIT)) == ("a", "b")
    assert flight.submit("c", lambda: "c").result(WAIT) == "c"


def test_a_call_finishes_when_nobody_waits_for_it() -> None:
    flight: SingleFlight[None] = SingleFlight(workers=1)
    release = threading.Event()
    done = threading.Event()

    def work() -> None:
        assert release.wait(WAIT)
        done.set()

    caller = threading.Thread(target=lambda: flight.submit("k", work))
    caller.start()
    caller.join()  # the caller is gone before the work even finished
    release.set()
    assert done.wait(WAIT)
