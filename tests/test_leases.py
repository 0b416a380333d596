"""Leases in the storage, on the real backends: a Ceph RGW bucket and a
directory, each opened twice as two replicas would. Expiry is driven by each
storage's clock, not by sleeping."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nixery.leases import Leases
from nixery.storage import FilesystemStorage, Storage
from nixery.storage.base import Lease
from tests.s3server import S3Server

TTL = 30.0
OpenStorage = Callable[[], Storage]


@pytest.fixture(params=["s3", "fs"])
def open_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStorage]:
    """Opens the same shared storage again on each call, as a new replica would."""
    opened: list[Storage] = []
    if request.param == "fs":

        def open_fs() -> Storage:
            opened.append(FilesystemStorage(tmp_path / "shared", clean_tmp=False))
            return opened[-1]

        yield open_fs
    else:
        from nixery.storage.s3 import S3Storage

        s3: S3Server = request.getfixturevalue("s3_server")
        bucket = s3.new_bucket()
        env = s3.env

        def open_s3() -> Storage:
            with pytest.MonkeyPatch.context() as patch:
                for name, value in env.items():
                    patch.setenv(name, value)
                opened.append(S3Storage(bucket, endpoint_url=s3.endpoint, path_style=True))
            return opened[-1]

        yield open_s3
    for storage in opened:
        storage.close()


def later(storage: Storage, seconds: float) -> None:
    """Move `storage`'s clock forward."""
    start = storage.clock()
    storage.clock = lambda: start + seconds  # type: ignore[method-assign]


def test_one_holder_at_a_time_until_release(open_storage: OpenStorage) -> None:
    a, b = open_storage(), open_storage()
    assert a.leases_exclusive() and b.leases_exclusive()
    held = a.acquire_lease("images/k", "a", TTL)
    assert held is not None and held.holder == "a"
    assert b.acquire_lease("images/k", "b", TTL) is None
    seen = b.read_lease("images/k")
    assert seen is not None and seen.holder == "a" and seen.expires > b.clock()
    # Another key is another lease.
    assert b.acquire_lease("layers/k", "b", TTL) is not None

    renewed = a.renew_lease(held, TTL)
    assert renewed is not None
    assert b.acquire_lease("images/k", "b", TTL) is None
    a.release_lease(renewed)
    assert b.acquire_lease("images/k", "b", TTL) is not None
    assert a.acquire_lease("images/k", "a", TTL) is None


def test_an_expired_lease_is_taken_over_and_its_old_holder_loses_it(
    open_storage: OpenStorage,
) -> None:
    a, b = open_storage(), open_storage()
    held = a.acquire_lease("images/k", "a", TTL)
    assert held is not None
    later(b, TTL + 1)
    taken = b.acquire_lease("images/k", "b", TTL)
    assert taken is not None and taken.holder == "b"
    # The old holder can neither renew nor release what is now b's.
    assert a.renew_lease(held, TTL) is None
    a.release_lease(held)
    current = a.read_lease("images/k")
    assert current is not None and current.holder == "b"


def test_of_replicas_racing_for_an_expired_lease_exactly_one_wins(
    open_storage: OpenStorage,
) -> None:
    first = open_storage()
    assert first.acquire_lease("images/race", "dead", TTL) is not None
    racers = [open_storage() for _ in range(4)]
    for storage in racers:
        later(storage, TTL + 1)
    for round_ in range(3):
        winners = [w for w in race(racers, "images/race") if w is not None]
        assert len(winners) == 1, (round_, winners)
        for storage in racers:  # the winner's lease expires before the next round
            later(storage, TTL + 1)


def race(storages: list[Storage], key: str) -> list[Lease | None]:
    """Each storage tries to take `key` at the same moment, on its own thread."""
    barrier = threading.Barrier(len(storages))
    won: list[Lease | None] = [None] * len(storages)

    def take(i: int) -> None:
        barrier.wait()
        won[i] = storages[i].acquire_lease(key, f"r{i}", TTL)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(storages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won


def test_a_lease_held_by_a_killed_process_expires(open_storage: OpenStorage) -> None:
    storage = open_storage()
    code = (
        "import sys, json\n"
        "from nixery.leases import Leases\n"
        "from nixery.storage import FilesystemStorage\n"
        "s = FilesystemStorage(sys.argv[1], clean_tmp=False)\n"
    )
    if isinstance(storage, FilesystemStorage):
        argv = [sys.executable, "-c", code + _HOLD, str(storage.root)]
        env = None
    else:
        from nixery.storage.s3 import S3Storage

        assert isinstance(storage, S3Storage)
        s3_code = (
            "import sys\n"
            "from nixery.leases import Leases\n"
            "from nixery.storage.s3 import S3Storage\n"
            "s = S3Storage(sys.argv[1], endpoint_url=sys.argv[2], path_style=True)\n"
        )
        argv = [sys.executable, "-c", s3_code + _HOLD, storage.bucket]
        argv.append(str(storage.client.meta.endpoint_url))
        env = _s3_env()
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == b"holding"
    holder.kill()  # SIGKILL: no release, no more renewals
    holder.wait()

    leases = Leases(storage, ttl=TTL, holder="survivor")
    assert storage.acquire_lease("images/dead", "survivor", TTL) is None
    later(storage, TTL + 1)
    done = leases.run_once("images/dead", lambda: None, lambda: "built")
    assert done == "built"


_HOLD = (
    "leases = Leases(s, ttl=30)\n"
    "claim = leases.claim('images/dead')\n"
    "assert claim.__enter__()\n"
    "print('holding', flush=True)\n"
    "import time; time.sleep(600)\n"
)


def _s3_env() -> dict[str, str]:
    import os

    from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY

    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }


def test_waiters_take_the_holders_result_and_work_runs_once(open_storage: OpenStorage) -> None:
    """Two replicas, several threads each: the work runs once, all get its result."""
    replicas = [Leases(open_storage(), ttl=TTL) for _ in range(2)]
    store = replicas[0].storage
    runs: list[str] = []
    waits: list[str] = []
    started = threading.Event()
    release = threading.Event()

    def ready() -> bytes | None:
        return store.get_document("results/x")

    def work(holder: str) -> bytes:
        runs.append(holder)
        started.set()
        release.wait(60)
        store.put_document("results/x", holder.encode())
        return holder.encode()

    results: list[bytes] = []

    def ask(leases: Leases) -> None:
        on_wait = lambda: waits.append(leases.holder)  # noqa: E731
        results.append(leases.run_once("results/x", ready, lambda: work(leases.holder), on_wait))

    threads = [threading.Thread(target=ask, args=(r,)) for r in replicas]
    threads[0].start()
    assert started.wait(60)
    threads[1].start()
    # The second waits for the lease; let it see the lease at least once.
    while not waits:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(60)
    assert runs == [replicas[0].holder]
    assert waits == [replicas[1].holder]
    assert results == [replicas[0].holder.encode()] * 2
    # Released: the key is free again.
    assert store.read_lease("results/x") is None or store.read_lease("results/x").expires == 0  # type: ignore[union-attr]


def test_a_held_lease_is_renewed_while_the_work_runs(open_storage: OpenStorage) -> None:
    storage = open_storage()
    leases = Leases(storage, ttl=1.5)
    with leases.claim("images/long") as held:
        assert held
        first = storage.read_lease("images/long")
        assert first is not None

        def renewed() -> bool:
            current = storage.read_lease("images/long")
            return current is not None and current.expires > first.expires

        deadline = time.monotonic() + 60
        while not renewed():
            assert time.monotonic() < deadline, "never renewed"
            time.sleep(0.05)
    other = open_storage()
    assert other.acquire_lease("images/long", "other", TTL) is not None
