"""Replicas sharing one storage build each image once: real server processes
on one Ceph RGW bucket, or on one directory, real Nix, a build held at a
gate so that every request arrives while it runs."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.clients import skopeo_copy
from tests.conftest import Server, StartServer, require
from tests.gated import WAITING, GatedPackage
from tests.http import Reply, call
from tests.s3server import S3Server
from tests.test_observability import OCI, activity, metric, scrape, wait_until

pytestmark = pytest.mark.e2e

BUILT = re.compile(r"built \S+ for \S+ in \S+ \((\d+) layers, packed (\d+) layers\)")
StartReplica = Callable[..., Server]


@pytest.fixture(params=["s3", "fs"])
def start_replica(
    request: pytest.FixtureRequest,
    start_server: StartServer,
    gated: GatedPackage,
    tmp_path: Path,
) -> StartReplica:
    """Starts replicas on one shared storage: an RGW bucket or a directory."""
    gate = ("--overlay", str(gated.overlay), "--nix-timeout", "180")
    if request.param == "fs":
        shared = tmp_path / "shared"
        return lambda *args: start_server(*gate, *args, storage=shared)
    s3_server: S3Server = request.getfixturevalue("s3_server")
    bucket = s3_server.new_bucket()

    def start(*args: str) -> Server:
        return start_server(
            *gate, "--storage-backend", "s3", "--s3-bucket", bucket,
            "--s3-endpoint", s3_server.endpoint, "--s3-path-style", *args, env=s3_server.env,
        )  # fmt: skip

    return start


class Pulls:
    """Manifest requests running in the background."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.threads: list[threading.Thread] = []

    def start(self, server: Server, image: str) -> None:
        def pull() -> None:
            try:
                reply = call(
                    server.host, "GET", f"/v2/{image}/manifests/latest", {"Accept": OCI}, 300
                )
            except (OSError, http.client.HTTPException):  # its server was killed
                reply = Reply(0, http.client.HTTPMessage(), b"")
            self.replies.append(reply)

        thread = threading.Thread(target=pull, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> list[Reply]:
        for thread in self.threads:
            thread.join(300)
        assert len(self.replies) == len(self.threads), "a pull did not finish"
        return self.replies


@pytest.fixture
def pulls() -> Iterator[Pulls]:
    yield Pulls()


def at_gate(server: Server) -> bool:
    """Whether `server` runs a build that waits at the gate."""
    return any(WAITING in b["log"] for b in activity(server)["running"])


def lease_waits(server: Server) -> float:
    return metric(scrape(server), "nixery_lease_waits_total", work="image")


def builds(servers: list[Server]) -> list[tuple[int, int]]:
    """(layers, layers packed) of every build the servers logged."""
    return [
        (int(m[1]), int(m[2])) for s in servers for m in BUILT.finditer(s.log_text())
    ]  # fmt: skip


def check_blobs(server: Server, body: dict) -> None:  # type: ignore[type-arg]
    """Every blob of the manifest is served whole, hashing to its digest."""
    for desc in [body["config"], *body["layers"]]:
        reply = call(server.host, "GET", f"/v2/x/blobs/{desc['digest']}")
        if reply.status == 307:
            location = reply.require_header("Location")
            host, path = location.removeprefix("http://").split("/", 1)
            reply = call(host, "GET", "/" + path)
        assert reply.status == 200
        assert "sha256:" + hashlib.sha256(reply.body).hexdigest() == desc["digest"]


def test_replicas_build_a_cold_image_once_and_pack_each_layer_once(
    start_replica: StartReplica, gated: GatedPackage, pulls: Pulls
) -> None:
    replicas = [start_replica() for _ in range(3)]
    image = f"shell/{gated.name}"
    for _ in range(3):
        for replica in replicas:
            pulls.start(replica, image)
    # One replica builds (held at the gate); the two others wait for it.
    holder = wait_until("a build at the gate", lambda: [r for r in replicas if at_gate(r)])[0]
    others = [r for r in replicas if r is not holder]
    for other in others:
        wait_until("the other replicas to wait", lambda r=other: lease_waits(r) == 1)  # type: ignore[misc]
    gated.open()

    replies = pulls.join()
    assert [r.status for r in replies] == [200] * 9, [r.body[:300] for r in replies]
    assert len({r.header("Docker-Content-Digest") for r in replies}) == 1
    logs = "".join(r.log_text() for r in replicas)
    assert logs.count("build started") == 1, logs
    [(layers, packed)] = builds(replicas)
    assert packed == layers == len(json.loads(replies[0].body)["layers"])
    assert "build started" in holder.log_text()
    assert [lease_waits(r) for r in others] == [1, 1]
    check_blobs(others[0], json.loads(replies[0].body))


def test_a_replica_killed_mid_build_is_taken_over_after_its_lease_expires(
    start_replica: StartReplica, gated: GatedPackage, pulls: Pulls, tmp_path: Path
) -> None:
    require("skopeo")
    holder, survivor = start_replica("--lease-ttl", "2"), start_replica("--lease-ttl", "2")
    image = f"shell/{gated.name}"
    pulls.start(holder, image)
    wait_until("the build at the gate", lambda: at_gate(holder))
    pulls.start(survivor, image)
    wait_until("the survivor to wait", lambda: lease_waits(survivor) == 1)

    holder.process.send_signal(signal.SIGKILL)
    holder.process.wait()
    wait_until("the takeover", lambda: "build started" in survivor.log_text())
    assert "expired: its holder" in survivor.log_text()
    gated.open()  # the dead holder's Nix build may still hold the package's lock

    [_, reply] = pulls.join()
    assert reply.status == 200, reply.body[:500]
    body = json.loads(reply.body)
    check_blobs(survivor, body)
    skopeo_copy(survivor.host, image, tmp_path / "oci")
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == reply.header("Docker-Content-Digest")
    [(layers, packed)] = builds([survivor])
    assert packed == layers


def test_a_lease_left_by_a_dead_replica_does_not_stop_a_new_one(
    start_replica: StartReplica, gated: GatedPackage, pulls: Pulls
) -> None:
    dead = start_replica("--lease-ttl", "3")
    image = f"shell/{gated.name}"
    pulls.start(dead, image)
    wait_until("the build at the gate", lambda: at_gate(dead))
    dead.process.send_signal(signal.SIGKILL)
    dead.process.wait()

    # Started after the death: it finds the dead replica's lease in the storage.
    fresh = start_replica("--lease-ttl", "3")
    pulls.start(fresh, image)
    wait_until("the new replica's build", lambda: "build started" in fresh.log_text())
    gated.open()
    [_, reply] = pulls.join()
    assert reply.status == 200, reply.body[:500]
    check_blobs(fresh, json.loads(reply.body))


def test_replicas_building_different_images_pack_their_shared_layers_once(
    start_replica: StartReplica, gated: GatedPackage, pulls: Pulls
) -> None:
    # A second gated package behind the same gate: both builds wait at it,
    # and both go on to pack at the same moment when it opens.
    twin = "gatedtwin"
    overlay = gated.directory / "twin.nix"
    overlay.write_text(gated.overlay.read_text().replace(gated.name, twin))
    first, second = (start_replica("--overlay", str(overlay)) for _ in range(2))
    # bigdata: a layer that takes a while to pack, so that the packings overlap.
    images = [f"bigdata/{gated.name}", f"bigdata/{twin}"]
    pulls.start(first, images[0])
    pulls.start(second, images[1])
    wait_until("both builds at the gate", lambda: at_gate(first) and at_gate(second))
    gated.open()
    replies = pulls.join()
    assert [r.status for r in replies] == [200, 200], [r.body[:300] for r in replies]
    layers = [{d["digest"] for d in json.loads(r.body)["layers"]} for r in replies]
    assert layers[0] & layers[1], "the two images were expected to share layers"
    # Every distinct layer was packed by exactly one of the replicas.
    packed = sum(p for _, p in builds([first, second]))
    assert packed == len(layers[0] | layers[1])
