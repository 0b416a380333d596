"""What the registry is building and has built, for people and for metrics.

`ImageService` reports each build's progress to a `BuildEvents` listener:
the page's `Activity` (builds in progress, recent builds and failures),
the Prometheus `Metrics`, and the terminal progress of `nixery build` all
listen to the same events.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nixery.errors import NixeryError
from nixery.storage import Storage

log = logging.getLogger(__name__)

# What a build is doing, and the coarser step each belongs to in metrics.
PHASE_STEP = {"evaluating": "nix", "building": "nix", "packing": "packing", "storing": "storing"}
STEPS = ("nix", "packing", "storing")
LOG_LINES = 50
HISTORY_DOCUMENT = "activity/builds.json"
HISTORY_SIZE = 50

SUCCESS = "success"
FAILURE = "failure"
UNKNOWN_PACKAGES = "unknown_packages"


class Build:
    """A build in progress. Written by its build thread, read by pages."""

    def __init__(
        self,
        image: str,
        tag: str,
        platform: str,
        packages: Sequence[str],
        key: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.image = image
        self.tag = tag
        self.platform = platform
        self.packages = tuple(packages)
        self.key = key  # the image document's key, for the image page
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._clock = clock  # seconds, for durations
        self._t0 = clock()
        self._phase_t0 = self._t0
        self._phase = "evaluating"
        self._step_seconds = dict.fromkeys(STEPS, 0.0)
        self._lines: deque[str] = deque(maxlen=LOG_LINES)
        self.done = 0
        self.total = 0

    @property
    def phase(self) -> str:
        return self._phase

    def enter(self, phase: str, total: int = 0) -> None:
        with self._lock:
            now = self._clock()
            self._step_seconds[PHASE_STEP[self._phase]] += now - self._phase_t0
            self._phase, self._phase_t0 = phase, now
            self.done, self.total = 0, total

    def advance(self) -> None:
        self.done += 1

    def log(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def elapsed(self) -> float:
        return self._clock() - self._t0

    def step_seconds(self) -> dict[str, float]:
        """Seconds spent per step so far, the current phase included."""
        with self._lock:
            seconds = dict(self._step_seconds)
            seconds[PHASE_STEP[self._phase]] += self._clock() - self._phase_t0
            return seconds

    def record(
        self,
        result: str,
        layers: Sequence[tuple[int, int]] = (),
        error: str | None = None,
        log_tail: str | None = None,
        profile: Mapping[str, float] | None = None,
    ) -> BuildRecord:
        """The finished build. `layers` are (size, was packed) pairs; `profile`
        is the finer account of a successful build (see `images.BuildProfile`)."""
        return BuildRecord(
            id=self.id,
            image=self.image,
            tag=self.tag,
            platform=self.platform,
            key=self.key,
            started_at=self.started_at,
            duration=self.elapsed(),
            steps=self.step_seconds(),
            result=result,
            layers=len(layers),
            packed=sum(1 for _, packed in layers if packed),
            size=sum(size for size, _ in layers),
            error=error,
            log=log_tail,
            profile=dict(profile or {}),
        )


@dataclass(frozen=True)
class BuildRecord:
    id: str
    image: str
    tag: str
    platform: str
    key: str
    started_at: float  # seconds since the epoch
    duration: float
    steps: Mapping[str, float] = field(default_factory=dict)
    result: str = SUCCESS
    layers: int = 0
    packed: int = 0
    size: int = 0  # compressed bytes of all layers
    error: str | None = None
    log: str | None = None
    profile: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result == SUCCESS

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> BuildRecord:
        known = BuildRecord.__dataclass_fields__
        return BuildRecord(**{k: v for k, v in data.items() if k in known})


class BuildEvents:
    """A listener of build events; every method does nothing by default."""

    def build_started(self, build: Build) -> None: ...

    def build_phase(self, build: Build) -> None:
        """The build entered a phase or made progress within it."""

    def build_log(self, build: Build, line: str) -> None: ...

    def build_ended(self, build: Build, record: BuildRecord) -> None: ...

    def cache_lookup(self, cache: str, hit: bool) -> None:
        """A lookup in one of the caches ("image", "layer")."""

    def lease_waited(self, work: str) -> None:
        """Another replica held the lease on a build ("image") or a layer's
        packing ("layer"): this one waited for its result instead."""


class Fanout(BuildEvents):
    """Passes every event on to several listeners, in order."""

    def __init__(self, *listeners: BuildEvents) -> None:
        self.listeners = listeners

    def build_started(self, build: Build) -> None:
        for listener in self.listeners:
            listener.build_started(build)

    def build_phase(self, build: Build) -> None:
        for listener in self.listeners:
            listener.build_phase(build)

    def build_log(self, build: Build, line: str) -> None:
        for listener in self.listeners:
            listener.build_log(build, line)

    def build_ended(self, build: Build, record: BuildRecord) -> None:
        for listener in self.listeners:
            listener.build_ended(build, record)

    def cache_lookup(self, cache: str, hit: bool) -> None:
        for listener in self.listeners:
            listener.cache_lookup(cache, hit)

    def lease_waited(self, work: str) -> None:
        for listener in self.listeners:
            listener.lease_waited(work)


class Activity(BuildEvents):
    """Builds in progress, and the latest finished builds and failures.

    The history is bounded and kept in one small storage document, so it
    survives restarts. Requests for unknown packages are not builds people
    need to see, so they are left out.
    """

    def __init__(self, storage: Storage | None = None, keep: int = HISTORY_SIZE) -> None:
        self.storage = storage
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._running: dict[str, Build] = {}
        self._builds: deque[BuildRecord] = deque(maxlen=keep)
        self._failures: deque[BuildRecord] = deque(maxlen=keep)
        self._load()

    def build_started(self, build: Build) -> None:
        with self._lock:
            self._running[build.id] = build

    def build_ended(self, build: Build, record: BuildRecord) -> None:
        with self._lock:
            self._running.pop(build.id, None)
            if record.result == UNKNOWN_PACKAGES:
                return
            (self._builds if record.ok else self._failures).appendleft(record)
        self._save()

    def running(self) -> list[Build]:
        with self._lock:
            return sorted(self._running.values(), key=lambda b: b.started_at)

    def builds(self) -> list[BuildRecord]:
        with self._lock:
            return list(self._builds)

    def failures(self) -> list[BuildRecord]:
        with self._lock:
            return list(self._failures)

    def find(self, build_id: str) -> Build | BuildRecord | None:
        with self._lock:
            if build_id in self._running:
                return self._running[build_id]
            return next((r for r in (*self._builds, *self._failures) if r.id == build_id), None)

    def _snapshot(self) -> bytes:
        return json.dumps(
            {
                "builds": [r.to_json() for r in self._builds],
                "failures": [r.to_json() for r in self._failures],
            }
        ).encode()

    def _save(self) -> None:
        if self.storage is None:
            return
        # Snapshots are taken and written in one order, so the newest wins.
        with self._save_lock:
            with self._lock:
                data = self._snapshot()
            try:
                self.storage.put_document(HISTORY_DOCUMENT, data)
            except NixeryError:
                log.warning("could not save the build history", exc_info=True)

    def _load(self) -> None:
        if self.storage is None:
            return
        try:
            raw = self.storage.get_document(HISTORY_DOCUMENT)
            data = json.loads(raw) if raw else {}
            builds = [BuildRecord.from_json(r) for r in data.get("builds", [])]
            failures = [BuildRecord.from_json(r) for r in data.get("failures", [])]
        except (NixeryError, ValueError, TypeError):
            log.warning("ignoring an unreadable build history", exc_info=True)
            return
        self._builds.extend(builds)
        self._failures.extend(failures)
