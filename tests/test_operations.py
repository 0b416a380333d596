"""Running the registry: startup errors, stopping, and bounded metrics, on the real server."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.attack import descendants
from tests.conftest import FIXTURE_PKGS, Server, StartServer
from tests.gated import WAITING, GatedPackage
from tests.http import Reply, call
from tests.test_observability import OCI, activity, wait_until


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`nixery serve` that is expected to refuse to start."""
    argv = [sys.executable, "-m", "nixery", "serve", "--host", "127.0.0.1",
            "--pkgs-path", str(FIXTURE_PKGS), *args]  # fmt: skip
    if "--storage-path" not in args:
        argv += ["--storage-path", str(tmp_path / "storage")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def assert_clear_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith("Error: "), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_a_port_in_use_or_an_unknown_host_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_clear_error(serve(tmp_path, "--port", port), "127.0.0.1", port, "in use")
    unknown = serve(tmp_path, "--port", "0", "--host", "no-such-host.invalid")
    assert_clear_error(unknown, "no-such-host.invalid")


def test_an_unusable_storage_path_or_tls_file_is_a_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("not a directory")
    assert_clear_error(serve(tmp_path, "--storage-path", str(file / "x")), str(file / "x"))
    pem = tmp_path / "junk.pem"
    pem.write_text("not a certificate\n")
    result = serve(tmp_path, "--port", "0", "--tls-cert", str(pem), "--tls-key", str(pem))
    assert_clear_error(result, str(pem))


def methods(server: Server) -> set[str]:
    reply = call(server.host, "GET", "/metrics")
    found = set()
    for family in text_string_to_metric_families(reply.body.decode()):
        if family.name == "nixery_http_requests":
            found |= {s.labels["method"] for s in family.samples}
    return found


def test_request_metrics_do_not_take_label_values_from_clients(server: Server) -> None:
    for verb in ("FOO1", "FOO2", "BREW", "PUT", "OPTIONS"):
        assert call(server.host, verb, "/v2/").status == 405
    call(server.host, "HEAD", "/v2/")
    assert methods(server) == {"GET", "HEAD", "PUT", "OPTIONS", "other"}


@pytest.mark.e2e
def test_sigterm_during_a_build_lets_it_finish_and_exits_cleanly(
    start_server: StartServer, gated: GatedPackage
) -> None:
    server = start_server("--overlay", str(gated.overlay), "--nix-timeout", "120")
    image = gated.name
    replies: list[Reply] = []
    pull = threading.Thread(
        target=lambda: replies.append(
            call(server.host, "GET", f"/v2/{image}/manifests/latest", {"Accept": OCI})
        )
    )
    pull.start()

    def waiting() -> Any:
        return [b for b in activity(server)["running"] if WAITING in b["log"]]

    wait_until("the build to wait at its gate", waiting)
    server.process.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        server.process.wait(1)  # still finishing the build
    gated.open()
    assert server.process.wait(120) == 0
    pull.join(10)
    log = server.log_text()
    assert "Traceback" not in log and "build failed" not in log, log
    assert "stopping" in log and f"built {image}" in log, log

    # The build was stored whole: a new server serves it without building.
    again = start_server("--overlay", str(gated.overlay), storage=server.storage)
    history = activity(again)
    assert [r["image"] for r in history["builds"]] == [image] and not history["failures"]
    reply = call(again.host, "GET", f"/v2/{image}/manifests/latest", {"Accept": OCI})
    assert reply.status == 200
    assert "build started" not in again.log_text()


def test_debug_json_logs_hold_no_s3_credentials_and_carry_utc_times(tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    with closed:
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        argv = [sys.executable, "-m", "nixery", "serve", "--port", "0", "--pkgs-path",
                str(FIXTURE_PKGS), "--storage-backend", "s3", "--s3-bucket", "b",
                "--s3-endpoint", endpoint, "--s3-region", "us-east-1",
                "--log-level", "debug", "--log-format", "json"]  # fmt: skip
        secrets = {"AWS_ACCESS_KEY_ID": "AKIDLOGTEST", "AWS_SECRET_ACCESS_KEY": "s3cr3tLOGTEST"}
        env = {**os.environ, **secrets, "TZ": "Asia/Tokyo"}
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1 and "checking bucket b" in result.stderr, result.stderr
    *lines, error = result.stderr.splitlines()
    assert error.startswith("Error: ")
    entries = [json.loads(line) for line in lines]
    assert entries, result.stderr
    for secret in (*secrets.values(), "Authorization", "Signature"):
        assert secret not in result.stderr
    for entry in entries:
        time = dt.datetime.fromisoformat(entry["time"])
        assert time.utcoffset() == dt.timedelta(0), entry


def test_text_logs_keep_one_line_per_event_whatever_the_path(server: Server) -> None:
    forged = "2026-01-01 00:00:00,000 ERROR nixery.images.service: forged"
    path = "/v2/x/manifests/a%0A" + forged.replace(" ", "%20")
    assert call(server.host, "GET", path, {"X-Request-Id": "inject-1"}).status == 400
    server.stop()
    lines = server.log_text().splitlines()
    assert not any(line.startswith(forged) for line in lines), lines
    [access] = [line for line in lines if "request_id=inject-1" in line]
    assert "nixery.access: GET /v2/x/manifests/a\\n2026-01-01" in access


def commands_below(pid: int) -> dict[int, str]:
    """The live processes below `pid`, with their command lines."""
    commands = {}
    for child in descendants(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        commands[child] = command.replace(b"\0", b" ").decode()
    return commands


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.e2e
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_layers_are_packed_in_worker_processes_that_end_with_the_server(
    server: Server, stop: signal.Signals
) -> None:
    reply = call(server.host, "GET", "/v2/shell/manifests/latest", {"Accept": OCI})
    assert reply.status == 200, reply.body
    below = commands_below(server.process.pid)
    workers = {p: c for p, c in below.items() if "multiprocessing" in c}
    assert len(workers) >= 2, below  # the fork server and at least one worker
    server.process.send_signal(stop)
    assert server.process.wait(60) == (0 if stop == signal.SIGTERM else -stop)
    # Left alone, a worker would wait for work forever: each must be gone.
    wait_until("the workers to exit", lambda: not [p for p in workers if alive(p)])


@pytest.mark.e2e
def test_a_build_whose_worker_processes_were_killed_packs_on_threads(server: Server) -> None:
    reply = call(server.host, "GET", "/v2/hello/manifests/latest", {"Accept": OCI})
    assert reply.status == 200, reply.body
    below = commands_below(server.process.pid).items()
    workers = [p for p, c in below if "multiprocessing" in c and "resource_tracker" not in c]
    assert len(workers) >= 2  # the fork server and at least one worker
    for pid in workers:  # as the kernel's OOM killer would
        os.kill(pid, signal.SIGKILL)
    wait_until("the workers to end", lambda: not [p for p in workers if alive(p)])
    reply = call(server.host, "GET", "/v2/shell/manifests/latest", {"Accept": OCI})
    assert reply.status == 200, reply.body
    for layer in reply.json()["layers"]:
        blob = call(server.host, "GET", f"/v2/shell/blobs/{layer['digest']}")
        assert "sha256:" + hashlib.sha256(blob.body).hexdigest() == layer["digest"]
    assert "packing layers on threads for 60 s" in server.log_text()
