from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import zstandard

from nixery.assembly import archive
from nixery.assembly.archive import (
    GZIP,
    ZSTD,
    Compression,
    Output,
    write_root_layer,
    write_store_layer,
)
from nixery.assembly.rootfs import root_entries


class Collect:
    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def write(self, data: bytes) -> int:
        return self.buf.write(data)


def fake_store_path(root: Path, name: str) -> Path:
    """A tree with every kind of entry a store path can hold."""
    out = root / name
    (out / "bin").mkdir(parents=True)
    (out / "lib" / "deep").mkdir(parents=True)
    (out / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(out / "bin" / "tool", 0o555)
    (out / "lib" / "deep" / ("long-" * 40 + ".so")).write_bytes(b"\x7fELF" + bytes(range(256)) * 50)
    os.symlink("../bin/tool", out / "lib" / "link")
    os.link(out / "bin" / "tool", out / "lib" / "hardlink")
    return out


def pack(paths: list[str], level: int = 1) -> tuple[bytes, str]:
    sink = Collect()
    packed = write_store_layer(paths, [Output(Compression(GZIP, level), sink)])
    return sink.buf.getvalue(), packed.diff_id


def test_layers_are_byte_identical_and_diff_id_matches(tmp_path: Path) -> None:
    a = fake_store_path(tmp_path, "aaa-a")
    b = fake_store_path(tmp_path, "bbb-b")
    blob1, diff1 = pack([str(b), str(a)])
    os.utime(a / "bin" / "tool", (12345, 12345))  # host metadata must not leak in
    blob2, diff2 = pack([str(a), str(b)])
    assert blob1 == blob2
    raw = gzip.decompress(blob1)
    assert diff1 == diff2 == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_entries_are_sorted_normalised_and_complete(tmp_path: Path) -> None:
    a = fake_store_path(tmp_path, "aaa-a")
    blob, _ = pack([str(a)])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[:2] == ["nix", "nix/store"]
    assert all(m.mode == 0o755 for m in members[:2] if m.isdir())
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (1, 0, 0, "", "")
        assert not m.pax_headers.keys() - {"path", "linkpath"}
    prefix = str(a).lstrip("/")
    by_name = {m.name: m for m in members}
    assert by_name[f"{prefix}/lib/link"].issym()
    assert by_name[f"{prefix}/lib/link"].linkname == "../bin/tool"
    assert by_name[f"{prefix}/lib/hardlink"].isfile()  # hard links become files
    assert by_name[f"{prefix}/bin/tool"].mode == 0o555
    store_names = [n for n in names if n.startswith(prefix)]
    assert store_names == sorted(store_names, key=lambda n: n.split("/"))


def test_root_layer_joins_packages(tmp_path: Path) -> None:
    a = fake_store_path(tmp_path, "aaa-a")
    b = tmp_path / "bbb-b"
    (b / "bin").mkdir(parents=True)
    (b / "bin" / "other").write_text("x")
    (b / "share").mkdir()
    entries = {e.path: e for e in root_entries([("b", str(b)), ("a", str(a))])}
    assert entries["bin"].kind == "dir"
    assert entries["bin/tool"].target == str(a / "bin" / "tool")
    assert entries["bin/other"].target == str(b / "bin" / "other")
    assert entries["share"].target == str(b / "share")
    assert entries["lib"].target == str(a / "lib")
    assert entries["tmp"].mode == 0o1777
    assert b"root:x:0:0" in entries["etc/passwd"].content
    assert b"hosts: files dns\n" in entries["etc/nsswitch.conf"].content
    sink1, sink2 = Collect(), Collect()
    gzip = Compression(GZIP, 1)
    write_root_layer(list(entries.values()), [Output(gzip, sink1)])
    write_root_layer(list(reversed(entries.values())), [Output(gzip, sink2)])
    assert sink1.buf.getvalue() == sink2.buf.getvalue()


def test_root_layer_expands_symlinked_dirs_to_add_files(tmp_path: Path) -> None:
    cacert = tmp_path / "ccc-cacert"
    (cacert / "etc" / "ssl" / "certs").mkdir(parents=True)
    (cacert / "etc" / "ssl" / "certs" / "ca-bundle.crt").write_text("CERT")
    entries = {e.path: e for e in root_entries([("cacert", str(cacert))])}
    assert entries["etc"].kind == "dir"
    assert entries["etc/ssl/certs/ca-bundle.crt"].kind == "symlink"
    assert entries["etc/ssl/certs/ca-certificates.crt"].target.endswith("ca-bundle.crt")


def big_store_path(root: Path, name: str, mib: int) -> Path:
    """A store path larger than several chunks, partly compressible."""
    out = root / name
    (out / "share").mkdir(parents=True)
    (out / "share" / "random.bin").write_bytes(os.urandom(mib << 19))
    (out / "share" / "text.txt").write_bytes(b"compressible line\n" * (mib << 15))
    return out


def test_threaded_encoders_give_the_same_bytes_for_gzip_and_zstd(tmp_path: Path) -> None:
    paths = [str(big_store_path(tmp_path, "aaa-big", 5)), str(fake_store_path(tmp_path, "bbb-b"))]
    compressions = [Compression(GZIP, 1), Compression(ZSTD, 3)]
    results = []
    for threaded in (False, True):
        sinks = [Collect(), Collect()]
        packed = write_store_layer(
            paths,
            [Output(c, s) for c, s in zip(compressions, sinks, strict=True)],
            threaded=threaded,
        )
        results.append((packed, [s.buf.getvalue() for s in sinks]))
    assert results[0] == results[1]
    packed, (gz, zst) = results[0]
    tar = gzip.decompress(gz)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zst) == tar
    assert packed.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert packed.uncompressed_size == len(tar) > 5 << 20


class Failing:
    def __init__(self, after: int) -> None:
        self.left = after

    def write(self, data: bytes) -> int:
        self.left -= 1
        if self.left < 0:
            raise OSError("disk full")
        return len(data)


def test_a_failing_sink_fails_the_layer_and_stops_its_threads(tmp_path: Path) -> None:
    paths = [str(big_store_path(tmp_path, "aaa-big", 8))]
    before = set(threading.enumerate())
    outputs = [Output(Compression(GZIP, 1), Collect()), Output(Compression(ZSTD, 1), Failing(2))]
    with pytest.raises(OSError, match="disk full"):
        write_store_layer(paths, outputs)
    # The layer's own threads, not whatever else the process may start meanwhile.
    left = [t for t in set(threading.enumerate()) - before if t.name == "nixery-encoder"]
    assert left == [], [(t.name, t.daemon) for t in threading.enumerate()]


class FailingAtOnce:
    """A sink that fails on its first write, and says when it has."""

    def __init__(self) -> None:
        self.failed = threading.Event()

    def write(self, data: bytes) -> int:
        self.failed.set()
        raise OSError("disk full")


def test_a_failure_seen_at_the_last_chunk_stops_the_threads_too() -> None:
    # The encoder fails on a whole chunk; the producer first learns of it when
    # it hands over the last, partial chunk, in `finish`.
    before = set(threading.enumerate())
    sink = FailingAtOnce()
    tap = archive._Tap([Output(Compression(GZIP, 1), sink)], threaded=True)
    tap.write(os.urandom(archive.CHUNK))
    assert sink.failed.wait(60)
    encoder = tap._encoders[0]
    while encoder._error is None:  # set just after the sink raised
        time.sleep(0.001)
    tap.write(b"the rest")
    with pytest.raises(OSError, match="disk full"):
        tap.finish()
    left = [t for t in set(threading.enumerate()) - before if t.name == "nixery-encoder"]
    assert left == []


def test_a_worker_process_writes_the_same_layer_into_files(tmp_path: Path) -> None:
    from nixery.assembly import procpool

    store, spool = tmp_path / "store", tmp_path / "spool"
    spool.mkdir()
    paths = [str(big_store_path(store, "aaa-big", 3)), str(fake_store_path(store, "bbb-b"))]
    compressions = [Compression(GZIP, 1), Compression(ZSTD, 3)]
    sinks = [Collect(), Collect()]
    here = write_store_layer(
        paths, [Output(c, s) for c, s in zip(compressions, sinks, strict=True)]
    )
    packed, blobs = procpool.pack_store_layer(paths, compressions, str(spool))
    assert packed == here
    for blob, sink in zip(blobs, sinks, strict=True):
        data = Path(blob.path).read_bytes()
        assert Path(blob.path).parent == spool
        assert data == sink.buf.getvalue()
        assert (blob.digest, blob.size) == ("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    # A layer that cannot be packed leaves nothing behind.
    with pytest.raises(FileNotFoundError):
        procpool.pack_store_layer([str(store / "missing")], compressions, str(spool))
    assert sorted(spool.iterdir()) == sorted(Path(b.path) for b in blobs)


WATCH = """
import sys, time
from nixery.assembly import procpool
procpool._watch(int(sys.argv[1]))
print("watching", flush=True)
time.sleep(60)
"""
# As a system call filter that refuses pidfd_open (some sandboxes do).
NO_PIDFD = """
import os
def refused(pid, flags=0):
    raise PermissionError(1, "Operation not permitted")
os.pidfd_open = refused
"""


@pytest.mark.parametrize("prelude", ["", NO_PIDFD], ids=["pidfd", "no pidfd"])
def test_a_worker_ends_when_the_server_ends(prelude: str) -> None:
    server = subprocess.Popen(["sleep", "60"])
    worker = subprocess.Popen(
        [sys.executable, "-c", prelude + WATCH, str(server.pid)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "watching\n"
        assert worker.poll() is None
        server.kill()
        server.wait()
        assert worker.wait(10) == 1
    finally:
        server.kill()
        worker.kill()
        worker.wait()
