"""A bounded load on the real server: many concurrent pulls, no errors (timings: benchmarks/)."""

from __future__ import annotations

import pytest

from tests.conftest import Server
from tests.http import call

pytestmark = pytest.mark.e2e


def test_concurrent_pulls_of_cached_images_all_succeed(server: Server) -> None:
    from benchmarks.load import discover, run_load  # not shipped with the package's tests

    images = discover(server.host, ["hello", "jq"])
    result = run_load(server.host, images, clients=64, pulls=3, processes=2)
    assert result.errors == []
    assert len(result.pulls) == 64 * 3
    assert len(result.requests) == sum(1 + len(images[i % 2].blobs) for i in range(64 * 3))
    assert call(server.host, "GET", "/v2/").status == 200
