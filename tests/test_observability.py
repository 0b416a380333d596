"""Build visibility, metrics, health and logs, against the real server."""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.clients import skopeo_copy
from tests.conftest import Server, StartServer, require
from tests.gated import WAITING, GatedPackage
from tests.http import Reply, call

pytestmark = pytest.mark.e2e
OCI = "application/vnd.oci.image.manifest.v1+json"
T = TypeVar("T")


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 120) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = call(server.host, "GET", "/metrics")
    assert reply.status == 200
    assert reply.require_header("Content-Type").startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def activity(server: Server) -> dict[str, Any]:
    reply = call(server.host, "GET", "/builds.json")
    assert reply.status == 200
    return reply.json()


def test_metrics_count_builds_caches_bytes_and_requests(server: Server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    require("skopeo")
    before = scrape(server)
    assert metric(before, "nixery_builds_total", result="success") == 0
    skopeo_copy(server.host, "shell/hello", tmp_path / "oci")
    after = scrape(server)

    manifest = call(server.host, "GET", "/v2/shell/hello/manifests/latest", {"Accept": OCI}).json()
    layers = manifest["layers"]
    blob_bytes = sum(layer["size"] for layer in layers) + manifest["config"]["size"]

    assert metric(after, "nixery_builds_total", result="success") == 1
    assert metric(after, "nixery_cache_lookups_total", cache="image", result="miss") == 1
    assert metric(after, "nixery_cache_lookups_total", cache="layer", result="miss") == len(layers)
    assert metric(after, "nixery_cache_lookups_total", cache="layer", result="hit") == 0
    assert metric(after, "nixery_served_bytes_total", kind="blob") >= blob_bytes
    requests = {"route": "manifest", "method": "GET", "status": "200"}
    assert metric(after, "nixery_http_requests_total", **requests) >= 1
    assert metric(after, "nixery_build_duration_seconds_count", step="nix") == 1
    assert metric(after, "nixery_build_duration_seconds_sum", step="packing") > 0

    # The same image again (our GET above included) comes from the image cache.
    again = scrape(server)
    assert metric(again, "nixery_builds_total", result="success") == 1
    assert metric(again, "nixery_cache_lookups_total", cache="image", result="hit") >= 1

    # Another image shares layers with the first: those are layer cache hits.
    other = call(server.host, "GET", "/v2/shell/jq/manifests/latest", {"Accept": OCI}).json()
    shared = {layer["digest"] for layer in layers} & {layer["digest"] for layer in other["layers"]}
    assert shared
    third = scrape(server)
    assert metric(third, "nixery_builds_total", result="success") == 2
    assert metric(third, "nixery_cache_lookups_total", cache="layer", result="hit") == len(shared)
    new = metric(third, "nixery_cache_lookups_total", cache="layer", result="miss") - len(layers)
    assert new == len(other["layers"]) - len(shared)

    call(server.host, "GET", "/v2/helo/manifests/latest")
    typo = scrape(server)
    assert metric(typo, "nixery_builds_total", result="unknown_packages") == 1
    notfound = {"route": "manifest", "method": "GET", "status": "404"}
    assert metric(typo, "nixery_http_requests_total", **notfound) == 1
    assert metric(typo, "nixery_builds_in_progress") == 0


def test_a_build_outlives_its_client_and_shows_its_progress(
    start_server: StartServer, gated: GatedPackage
) -> None:
    server = start_server("--overlay", str(gated.overlay), "--nix-timeout", "120")
    image = f"shell/{gated.name}"
    client = socket.create_connection(server.host.split(":"), timeout=10)  # type: ignore[arg-type]
    client.sendall(
        f"GET /v2/{image}/manifests/latest HTTP/1.1\r\nHost: {server.host}\r\n"
        f"Accept: {OCI}\r\n\r\n".encode()
    )

    def running() -> dict[str, Any] | None:
        now = activity(server)
        assert not now["failures"], now["failures"]
        builds = [b for b in now["running"] if b["image"] == image]
        return builds[0] if builds and WAITING in builds[0]["log"] else None

    build = wait_until("the build to wait at its gate", running)
    assert build["phase"] == "building" and build["tag"] == "latest"
    front = call(server.host, "GET", "/").body.decode()
    assert "Building now" in front and WAITING in front and image in front
    assert '<meta http-equiv="refresh"' in front
    metrics = scrape(server)
    assert metric(metrics, "nixery_builds_in_progress") == 1

    # A second client asking for the same image waits for the same build.
    second: list[Reply] = []
    waiter = threading.Thread(
        target=lambda: second.append(
            call(server.host, "GET", f"/v2/{image}/manifests/latest", {"Accept": OCI})
        )
    )
    waiter.start()
    wait_until(
        "the second request to queue", lambda: metric(scrape(server), "nixery_builds_queued") == 1
    )

    client.close()  # the first client gives up, before the build may finish
    assert running() is not None, "the build stopped when its client left"
    gated.open()
    waiter.join(120)
    assert second and second[0].status == 200

    records = wait_until(
        "the build to finish",
        lambda: [r for r in activity(server)["builds"] if r["image"] == image],
    )
    assert len(records) == 1 and records[0]["packed"] >= 1

    # The retry gets the image the abandoned request's build stored, without a build.
    hits = metric(scrape(server), "nixery_cache_lookups_total", cache="image", result="hit")
    retry = call(server.host, "GET", f"/v2/{image}/manifests/latest", {"Accept": OCI})
    assert retry.status == 200 and retry.body == second[0].body
    after = scrape(server)
    assert metric(after, "nixery_cache_lookups_total", cache="image", result="hit") == hits + 1
    assert metric(after, "nixery_builds_total", result="success") == 1
    assert server.log_text().count("build started") == 1


def test_failures_are_listed_with_the_nix_log(server: Server) -> None:
    reply = call(server.host, "GET", "/v2/broken/manifests/latest")
    assert reply.status == 500
    [failure] = activity(server)["failures"]
    assert failure["image"] == "broken" and failure["result"] == "failure"
    assert "broken on purpose" in failure["log"]
    front = call(server.host, "GET", "/").body.decode()
    assert "Recent failures" in front and "broken on purpose" in front
    # Unknown names are not build failures people need to see.
    call(server.host, "GET", "/v2/nope/manifests/latest")
    assert len(activity(server)["failures"]) == 1


def test_history_survives_a_restart(start_server: StartServer) -> None:
    first = start_server()
    call(first.host, "GET", "/v2/hello/manifests/latest", {"Accept": OCI})
    first.stop()
    again = start_server(storage=first.storage)
    assert [r["image"] for r in activity(again)["builds"]] == ["hello"]


def test_healthz_ok(server: Server) -> None:
    reply = call(server.host, "GET", "/healthz")
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["status"] == "ok"
    assert body["checks"]["storage"]["ok"] and body["checks"]["nix"]["ok"]
    assert "Nix" in body["checks"]["nix"]["detail"]


def test_healthz_fails_without_nix_or_writable_storage(start_server: StartServer) -> None:
    no_nix = start_server(env={"PATH": "/nonexistent"})
    reply = call(no_nix.host, "GET", "/healthz")
    assert reply.status == 503
    checks = reply.json()["checks"]
    assert not checks["nix"]["ok"] and checks["storage"]["ok"]
    # Not ready, but alive: liveness probes must not restart it.
    assert call(no_nix.host, "GET", "/livez").status == 200

    broken = start_server()
    tmp = broken.storage / "tmp"
    shutil.rmtree(tmp)  # with the writer's own directory in it
    tmp.write_text("not a directory")  # every write goes through tmp/
    reply = call(broken.host, "GET", "/healthz")
    assert reply.status == 503
    checks = reply.json()["checks"]
    assert not checks["storage"]["ok"] and checks["nix"]["ok"]
    assert call(broken.host, "GET", "/livez").status == 200


def test_json_log_lines_carry_request_id_image_and_tag(start_server: StartServer) -> None:
    server = start_server("--log-format", "json")
    reply = call(
        server.host, "GET", "/v2/shell/hello/manifests/latest",
        {"Accept": OCI, "X-Request-Id": "trace-42"},
    )  # fmt: skip
    assert reply.status == 200 and reply.header("X-Request-Id") == "trace-42"
    generated = call(server.host, "GET", "/").header("X-Request-Id")
    assert generated and re.fullmatch(r"[0-9a-f]{32}", generated)
    hostile = call(server.host, "GET", "/", {"X-Request-Id": "bad id\u00e9"}).header("X-Request-Id")
    assert hostile and re.fullmatch(r"[0-9a-f]{32}", hostile)

    server.stop()
    entries = [json.loads(line) for line in server.log_text().splitlines() if line.strip()]
    mine = [e for e in entries if e.get("request_id") == "trace-42"]
    built = [e for e in mine if e["message"].startswith("built ")]
    assert len(built) == 1
    assert (built[0]["image"], built[0]["tag"]) == ("shell/hello", "latest")
    assert built[0]["layers"] >= 2 and built[0]["duration"] > 0
    [access] = [e for e in mine if e["logger"] == "nixery.access"]
    assert access["route"] == "manifest" and access["status"] == 200
    assert access["image"] == "shell/hello" and access["bytes"] == len(reply.body)
    assert {e["level"] for e in entries} <= {"DEBUG", "INFO", "WARNING", "ERROR"}


def test_text_log_lines_are_one_per_event(server: Server) -> None:
    call(server.host, "GET", "/v2/hello/manifests/latest", {"X-Request-Id": "abc-1"})
    server.stop()
    lines = [line for line in server.log_text().splitlines() if "request_id=abc-1" in line]
    assert any(
        "nixery.images.pipeline: built hello" in line and "tag=latest" in line for line in lines
    )
    assert any("nixery.access: GET /v2/hello/manifests/latest 200" in line for line in lines)
