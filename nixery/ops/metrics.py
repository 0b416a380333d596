"""Prometheus metrics, in a registry of their own per app (not the global
one), fed by build events and by the HTTP layer."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from nixery.images.activity import (
    FAILURE,
    STEPS,
    SUCCESS,
    UNKNOWN_PACKAGES,
    Build,
    BuildEvents,
    BuildRecord,
)

CACHES = ("image", "layer")
# Why the HTTP server closes a connection itself (nixery.http.server).
CLOSE_REASONS = ("too_many_connections", "head_timeout", "send_timeout", "idle_timeout")
BUILD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# The HTTP methods (RFC 9110, and PATCH) a label may name; clients may send any
# token as a method, and each new label value would be a new series.
METHODS = frozenset("GET HEAD POST PUT PATCH DELETE OPTIONS TRACE CONNECT".split())


class Metrics(BuildEvents):
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.builds = Counter("nixery_builds", "Image builds by result.", ["result"], registry=r)
        self.build_seconds = Histogram(
            "nixery_build_duration_seconds",
            "Seconds builds spent per step (nix: evaluate and build; packing: layers;"
            " storing: configs and manifests).",
            ["step"],
            buckets=BUILD_BUCKETS,
            registry=r,
        )
        self.cache = Counter(
            "nixery_cache_lookups", "Cache lookups by cache and result.", ["cache", "result"],
            registry=r,
        )  # fmt: skip
        self.served = Counter(
            "nixery_served_bytes", "Bytes of blobs and manifests served.", ["kind"], registry=r
        )
        self.requests = Counter(
            "nixery_http_requests", "HTTP requests by route, method and status.",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "nixery_http_request_duration_seconds", "HTTP request latency by route.", ["route"],
            registry=r,
        )  # fmt: skip
        self.connections_closed = Counter(
            "nixery_http_connections_closed",
            "Connections the server closed, by reason: too_many_connections (from one address;"
            " answered 429), head_timeout (no whole request in time), send_timeout (the client"
            " did not read), idle_timeout (a kept-alive connection went unused).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.connections_open = Gauge(
            "nixery_http_connections_open", "Client connections open now.", registry=r
        )
        self.requests_held = Gauge(
            "nixery_http_requests_waiting_for_share",
            "Requests waiting because their client address has its share of threads.",
            registry=r,
        )
        self.lease_waits = Counter(
            "nixery_lease_waits",
            "Image builds and layer packings left to another replica that held their"
            " lease; this one waited for the result instead.",
            ["work"],
            registry=r,
        )
        self.in_progress = Gauge("nixery_builds_in_progress", "Builds running now.", registry=r)
        self.queued = Gauge(
            "nixery_builds_queued", "Requests waiting for a build that is running.", registry=r
        )
        # Every series exists from the start, so rates work from the first event.
        for result in (SUCCESS, FAILURE, UNKNOWN_PACKAGES):
            self.builds.labels(result)
        for step in STEPS:
            self.build_seconds.labels(step)
        for cache in CACHES:
            for outcome in ("hit", "miss"):
                self.cache.labels(cache, outcome)
        for kind in ("blob", "manifest"):
            self.served.labels(kind)
        for reason in CLOSE_REASONS:
            self.connections_closed.labels(reason)
        for work in CACHES:
            self.lease_waits.labels(work)

    def track(self, in_progress: Callable[[], int], queued: Callable[[], int]) -> None:
        """Read the build gauges from the service when scraped."""
        self.in_progress.set_function(in_progress)
        self.queued.set_function(queued)

    def track_connections(self, open_: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Read the connection gauges from the server when scraped."""
        self.connections_open.set_function(open_)
        self.requests_held.set_function(waiting)

    def connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason).inc()

    def build_ended(self, build: Build, record: BuildRecord) -> None:
        self.builds.labels(record.result).inc()
        if record.result != UNKNOWN_PACKAGES:
            for step, seconds in record.steps.items():
                self.build_seconds.labels(step).observe(seconds)

    def cache_lookup(self, cache: str, hit: bool) -> None:
        self.cache.labels(cache, "hit" if hit else "miss").inc()

    def lease_waited(self, work: str) -> None:
        self.lease_waits.labels(work).inc()

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def bytes_served(self, kind: str, size: int) -> None:
        self.served.labels(kind).inc(size)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition in the format `accept` asks for, and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
