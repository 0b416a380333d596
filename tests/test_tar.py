"""The tar writer: readable by tarfile and GNU tar, exact for awkward names,
and stable bytes (a change here changes every layer digest)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

from nixery.assembly import tar
from nixery.assembly.archive import GZIP, Compression, Output, write_store_layer

# Also what tarfile (Python 3.11) writes for these entries in PAX format.
GOLDEN = "b9a39dcc30f1a8b6e5de0a35443b010aa9e7dc61dbc5b76f95b75b15f9c42eab"


class Collect:
    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def write(self, data: bytes) -> int:
        return self.buf.write(data)


def awkward_tree(root: Path) -> Path:
    """Names around the 100-byte ustar limit, non-ASCII and invalid UTF-8
    names, long and odd link targets, empty and odd-sized files."""
    out = root / "aaa-awkward"
    base = os.fsencode(out) + b"/"
    os.makedirs(base + b"d" * 120)
    for n in range(60, 90):
        with open(base + b"f" * n, "wb") as fh:
            fh.write(bytes(range(256)) * n)
        os.makedirs(base + b"e" * n)
    for name in ("café.txt".encode(), b"bad\xff\xfename", b"empty"):
        with open(base + name, "wb") as fh:
            fh.write(name * 3 if name != b"empty" else b"")
    os.symlink(b"/" + b"l" * 150, base + b"longlink")
    os.symlink("tárget".encode(), base + b"unilink")
    os.symlink(b"\xff\xfe", base + b"badlink")
    os.chmod(base + b"f" * 60, 0o4755)
    return out


def uncompressed(paths: list[str]) -> bytes:
    sink = Collect()
    write_store_layer(paths, [Output(Compression(GZIP, 0), sink)], threaded=False)
    return gzip.decompress(sink.buf.getvalue())


def test_tarfile_reads_back_every_entry(tmp_path: Path) -> None:
    tree = awkward_tree(tmp_path)
    data = uncompressed([str(tree)])
    assert len(data) % tar.RECORD == 0
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8") as archive:
        members = {os.fsencode(m.name): m for m in archive.getmembers()}
        for path, dirs, files in os.walk(os.fsencode(tree)):
            for name in dirs + files:
                full = os.path.join(path, name)
                member = members[full.lstrip(b"/")]
                st = os.lstat(full)
                assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
                    1, 0, 0, "", "",
                )  # fmt: skip
                if os.path.islink(full):
                    assert member.issym() and os.fsencode(member.linkname) == os.readlink(full)
                elif os.path.isdir(full):
                    assert member.isdir() and member.mode == st.st_mode & 0o7777
                else:
                    assert member.isfile() and member.mode == st.st_mode & 0o7777
                    content = archive.extractfile(member)
                    assert content is not None
                    assert content.read() == Path(os.fsdecode(full)).read_bytes()


def test_gnu_tar_extracts_the_same_tree(tmp_path: Path) -> None:
    tree = awkward_tree(tmp_path / "in")
    (tmp_path / "layer.tar").write_bytes(uncompressed([str(tree)]))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "layer.tar"), "-C", str(out)], check=True,
                   capture_output=True)  # fmt: skip
    extracted = out / str(tree).lstrip("/")
    for path, dirs, files in os.walk(os.fsencode(tree)):
        rel = os.path.relpath(path, os.fsencode(tree))
        other = os.path.join(os.fsencode(extracted), rel)
        assert sorted(os.listdir(other)) == sorted(dirs + files)
        for name in files:
            a, b = os.path.join(path, name), os.path.join(other, name)
            if os.path.islink(a):
                assert os.readlink(a) == os.readlink(b)
            else:
                assert Path(os.fsdecode(a)).read_bytes() == Path(os.fsdecode(b)).read_bytes()


def test_sizes_beyond_eleven_octal_digits_go_to_pax() -> None:
    size = 8**11 + 5
    head = tar.header(b"nix/store/big", tar.REGULAR, 0o644, 1, size=size)
    assert len(head) == 3 * tar.BLOCK  # pax header, its record, the entry
    info = tarfile.TarInfo.frombuf(head[-tar.BLOCK :], "utf-8", "strict")
    assert info.size == 0 and info.name == "nix/store/big"
    assert b" size=%d\n" % size in head[tar.BLOCK : 2 * tar.BLOCK]


def golden_archive() -> bytes:
    entries = [
        (b"nix", tar.DIRECTORY, 0o755, b"", b""),
        (b"nix/store/" + b"a" * 32 + b"-tool-1.0", tar.DIRECTORY, 0o555, b"", b""),
        (b"nix/store/" + b"a" * 32 + b"-tool-1.0/bin/" + b"t" * 60, tar.REGULAR, 0o555, b"", b"x"),
        (b"nix/store/" + b"a" * 32 + b"-tool-1.0/caf\xc3\xa9", tar.REGULAR, 0o644, b"", b"y" * 700),
        (b"nix/store/bad\xff", tar.SYMLINK, 0o777, b"/" + b"l" * 120, b""),
    ]
    out = b""
    for name, kind, mode, link, data in entries:
        out += tar.header(name, kind, mode, 1, size=len(data), link=link)
        out += data + tar.padding(len(data))
    return out + tar.end(len(out))


def test_bytes_are_stable() -> None:
    """Pinned: the same entries give the same bytes on any host and Python
    version. Changing this digest changes every layer: bump FORMAT_VERSION."""
    data = golden_archive()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        assert len(archive.getmembers()) == 5
    assert hashlib.sha256(data).hexdigest() == GOLDEN
