"""A throwaway S3 server for tests and benchmarks: Ceph's RADOS Gateway.

One monitor, one OSD on the in-memory MemStore object store, and radosgw with
the beast frontend, all on 127.0.0.1, with authentication between the
daemons turned off (S3 requests are still signed and checked). The daemons
run in the foreground as our children and are killed with us
(PR_SET_PDEATHSIG), so a crashed test run leaves nothing behind.

    python -m tests.s3server            # start, print exports, run until Ctrl-C
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = (
    "ceph",
    "ceph-mon",
    "ceph-osd",
    "radosgw",
    "radosgw-admin",
    "monmaptool",
    "ceph-authtool",
)
ACCESS_KEY = "NIXERYTESTACCESSKEY0"
SECRET_KEY = "nixery-test-secret-key-0123456789abcdefgh"
REGION = "us-east-1"
START_TIMEOUT = 90.0
PR_SET_PDEATHSIG = 1


class S3ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


@dataclass
class S3Server:
    """A running radosgw; `env` holds what boto3 and Nixery need to reach it."""

    root: Path
    port: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def new_bucket(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix`: key -> size."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def uploads_in_progress(self, bucket: str) -> list[str]:
        uploads = self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return [u["Key"] for u in uploads]

    def broken_blobs(self, bucket: str, prefix: str = "") -> list[str]:
        """Blob keys whose content does not hash to the digest in their name."""
        client = self.client()
        broken = []
        for key in self.keys(bucket, prefix + "blobs/sha256/"):
            digest = hashlib.sha256()
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(1 << 20):
                digest.update(chunk)
            body.close()
            if digest.hexdigest() != key.rsplit("/", 1)[1]:
                broken.append(key)
        return broken

    def alive(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes)

    def stop(self) -> None:
        # SIGKILL: a MemStore OSD would first write all its objects to disk.
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.kill()
        for proc in self.processes:
            proc.wait()
        self.processes.clear()

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _config(root: Path, fsid: str, s3_port: int, mon_port: int, osd_ports: int) -> str:
    return f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{mon_port}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_port_min = {osd_ports}
ms_bind_port_max = {osd_ports + 40}
# No cephx between the daemons; every messenger mode must then allow crc,
# or radosgw hangs at start-up waiting for an auth reply.
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc
ms_mon_cluster_mode = crc
ms_mon_service_mode = crc
ms_client_mode = crc
ms_cluster_mode = crc
ms_service_mode = crc
mon_warn_on_insecure_global_id_reclaim_allowed = false
run_dir = {root}/run
admin_socket = {root}/run/$cluster-$name.asok
log_file = {root}/log/$name.log
mon_cluster_log_file = {root}/log/cluster.log
keyring = {root}/keyring
# One OSD: one copy of everything, few placement groups.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 1000
mon_data_avail_warn = 1
mon_data_avail_crit = 0
# Commit map changes at once: radosgw creates its pools at first start,
# and the default interval makes that take over ten seconds.
paxos_propose_interval = 0.05
paxos_min_wait = 0.01

[mon]
mon_data = {root}/mon/$cluster-$id

[osd]
osd_data = {root}/osd/$cluster-$id
osd_objectstore = memstore
memstore_device_bytes = 8589934592

[client.rgw.a]
# Without tcp_nodelay a small GET waits ~40 ms for a delayed ACK.
rgw_frontends = beast endpoint=127.0.0.1:{s3_port} tcp_nodelay=1
rgw_data = {root}/rgw
rgw_thread_pool_size = 64
rgw_gc_obj_min_wait = 30
rgw_gc_processor_period = 30
"""


def _run(argv: list[str], log: Path, timeout: float = 60) -> None:
    with open(log, "ab") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise S3ServerError(f"{argv[0]} failed ({proc.returncode}); see {log}")


def _wait(what: str, ready, server: S3Server, deadline: float) -> None:  # type: ignore[no-untyped-def]
    while not ready():
        if not server.alive():
            raise S3ServerError(f"a Ceph daemon died while waiting for {what}")
        if time.monotonic() > deadline:
            raise S3ServerError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start(root: Path, port: int | None = None, timeout: float = START_TIMEOUT) -> S3Server:
    """Make a new cluster under `root` (which must be empty) and start it."""
    missing = missing_binaries()
    if missing:
        raise S3ServerError(f"missing {missing}: run scripts/bootstrap --test (Ceph from Debian)")
    deadline = time.monotonic() + timeout
    s3_port = port or free_port()
    server = S3Server(root, s3_port)
    for d in ("run", "log", "mon/ceph-a", "osd/ceph-0", "rgw"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "ceph.conf"
    fsid, mon_port = str(uuid.uuid4()), free_port()
    conf.write_text(_config(root, fsid, s3_port, mon_port, free_port()))
    c = ["-c", str(conf)]
    log = root / "log" / "setup.log"
    _run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
          str(root / "monmap")], log)  # fmt: skip
    _run(["ceph-authtool", "--create-keyring", str(root / "keyring"), "--gen-key", "-n", "mon.",
          "--cap", "mon", "allow *"], log)  # fmt: skip
    _run(["ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", str(root / "monmap"),
          "--keyring", str(root / "keyring")], log)  # fmt: skip

    def daemon(*argv: str) -> None:
        with open(root / "log" / f"{argv[0]}.out", "ab") as fh:
            server.processes.append(
                subprocess.Popen(
                    [*argv, "-f"],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent,
                )  # fmt: skip
            )

    try:
        daemon("ceph-mon", *c, "-i", "a")
        osd_uuid = str(uuid.uuid4())
        _run(["ceph", *c, "--connect-timeout", "30", "osd", "new", osd_uuid], log)
        _run(["ceph-osd", *c, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], log)
        daemon("ceph-osd", *c, "-i", "0")
        daemon("radosgw", *c, "-n", "client.rgw.a")
        _wait("radosgw to listen", lambda: _listening(s3_port), server, deadline)
        # radosgw makes its zone and pools before it listens; only then may
        # radosgw-admin add the user, or the two race to create the zone.
        _run(["radosgw-admin", *c, "user", "create", "--uid=nixery-test",
              "--display-name=nixery test", f"--access-key={ACCESS_KEY}",
              f"--secret-key={SECRET_KEY}"], log)  # fmt: skip
        client = server.client()

        def answers() -> bool:
            try:
                client.list_buckets()
                return True
            except Exception:
                return False

        _wait("signed requests to succeed", answers, server, deadline)
    except BaseException as exc:
        server.stop()
        if isinstance(exc, S3ServerError | subprocess.TimeoutExpired):
            raise S3ServerError(f"{exc}\n{server.log_tail()}") from exc
        raise
    return server


@contextmanager
def running(port: int | None = None) -> Iterator[S3Server]:
    with tempfile.TemporaryDirectory(prefix="nixery-s3-") as tmp:
        server = start(Path(tmp), port)
        try:
            yield server
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", default="nixery")
    args = parser.parse_args()
    started = time.monotonic()
    with running(args.port) as server:
        server.client().create_bucket(Bucket=args.bucket)
        print(f"# ready after {time.monotonic() - started:.1f}s; Ctrl-C stops it", file=sys.stderr)
        for name, value in server.env.items():
            print(f"export {name}={value}")
        print(f"export NIXERY_S3_ENDPOINT={server.endpoint}")
        print(f"export NIXERY_S3_BUCKET={args.bucket}")
        sys.stdout.flush()
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
