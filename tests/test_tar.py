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

import pytest

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


# -- pax records at the lengths where their decimal length gains a digit -----------------


def pax_records(head: bytes) -> list[tuple[bytes, bytes]]:
    """The records of a pax `x` header, checking that every stated length is exact."""
    size = int(head[124:135], 8)
    body = head[tar.BLOCK : tar.BLOCK + size]
    records = []
    while body:
        length_text, _, _ = body.partition(b" ")
        length = int(length_text)
        record = body[:length]
        assert record.endswith(b"\n"), (length, body[:40])
        key, _, value = record[len(length_text) + 1 : -1].partition(b"=")
        records.append((key, value))
        body = body[length:]
    return records


def names_around_boundaries(key: bytes, unit: bytes) -> list[bytes]:
    """Values of every byte length for which the record `LEN key=value\\n` is
    within a few bytes of 10, 100, 1000 or 10000 bytes long, built from `unit`
    (one- or two-byte characters) and padded with ASCII to the exact length."""
    values = []
    for boundary in (100, 1000, 10000):
        # A record is len(key) + len(value) + 3 bytes plus its length's digits.
        for total in range(boundary - 6, boundary + 6):
            for digits in (len(str(boundary - 1)), len(str(boundary))):
                length = total - len(key) - 3 - digits
                value = unit * (length // len(unit)) + b"x" * (length % len(unit))
                if len(value) > 100 or not value.isascii():  # else no pax record
                    values.append(value)
    return sorted(set(values), key=len)


def tarfile_member(data: bytes) -> tarfile.TarInfo:
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as a:
        members = a.getmembers()
    assert len(members) == 1
    return members[0]


def gnu_tar_listing(data: bytes, tmp_path: Path) -> list[bytes]:
    archive = tmp_path / "one.tar"
    archive.write_bytes(data)
    listing = subprocess.run(
        ["tar", "--quoting-style=literal", "-tvf", str(archive)],
        capture_output=True, check=True, env={**os.environ, "LC_ALL": "C.UTF-8"},
    )  # fmt: skip
    assert listing.stderr == b""
    return listing.stdout.splitlines()


def one_entry(name: bytes, kind: bytes, link: bytes = b"") -> bytes:
    data = tar.header(name, kind, 0o644 if kind == tar.REGULAR else 0o777, 1, link=link)
    return data + tar.end(len(data))


UNITS = {"ascii": b"a", "two-byte": "é".encode(), "three-byte": "€".encode()}


@pytest.mark.parametrize("unit", UNITS.values(), ids=list(UNITS))
def test_path_records_around_every_decimal_boundary(unit: bytes, tmp_path: Path) -> None:
    names = names_around_boundaries(b"path", unit)
    assert len(names) >= 20 and max(map(len, names)) > 9990
    for name in names:
        data = one_entry(name, tar.REGULAR)
        assert pax_records(data)[-1] == (b"path", name)
        assert os.fsencode(tarfile_member(data).name) == name
        # tarfile writes the same header for the same entry.
        info = tarfile.TarInfo(name.decode())
        info.mode, info.mtime, info.uname, info.gname = 0o644, 1, "", ""
        assert data.startswith(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    # GNU tar, for the names it can list (one at each boundary is enough to
    # show it parses the lengths; all of them would take a while).
    for name in names[:: max(1, len(names) // 12)]:
        (line,) = gnu_tar_listing(one_entry(name, tar.REGULAR), tmp_path)
        assert line.endswith(b" " + name), line[-60:]


@pytest.mark.parametrize("unit", UNITS.values(), ids=list(UNITS))
def test_linkpath_records_around_every_decimal_boundary(unit: bytes, tmp_path: Path) -> None:
    targets = names_around_boundaries(b"linkpath", unit)
    assert len(targets) >= 20
    for target in targets:
        data = one_entry(b"nix/store/link", tar.SYMLINK, link=target)
        assert pax_records(data)[-1] == (b"linkpath", target)
        member = tarfile_member(data)
        assert member.issym() and os.fsencode(member.linkname) == target
    for target in targets[:: max(1, len(targets) // 12)]:
        (line,) = gnu_tar_listing(one_entry(b"nix/store/link", tar.SYMLINK, target), tmp_path)
        assert line.endswith(b" nix/store/link -> " + target), line[-60:]


def test_path_and_linkpath_records_in_one_header() -> None:
    for name in names_around_boundaries(b"path", "é".encode())[:12]:
        for target in names_around_boundaries(b"linkpath", b"l")[:12]:
            data = one_entry(name, tar.SYMLINK, link=target)
            assert pax_records(data) == [(b"path", name), (b"linkpath", target)]
            member = tarfile_member(data)
            assert (os.fsencode(member.name), os.fsencode(member.linkname)) == (name, target)


def test_binary_names_around_the_boundaries() -> None:
    """Names that are not UTF-8 add an `hdrcharset` record before their own."""
    for name in names_around_boundaries(b"path", b"\xff"):
        data = one_entry(name, tar.REGULAR)
        assert pax_records(data) == [(b"hdrcharset", b"BINARY"), (b"path", name)]
        assert os.fsencode(tarfile_member(data).name) == name


def test_size_records_of_every_length() -> None:
    """Sizes past 11 octal digits, from 10 to 20 decimal digits."""
    for size in [8**11, 8**11 + 1, 10**10 - 1, 10**10, *(10**d + r for d in range(11, 20)
                                                          for r in (-1, 0, 1))]:  # fmt: skip
        if size < 8**11:
            continue
        head = tar.header(b"nix/store/big", tar.REGULAR, 0o644, 1, size=size)
        assert pax_records(head) == [(b"size", b"%d" % size)]
        # tarfile reads the size from the record (the data itself is not there).
        with tarfile.TarFile(fileobj=io.BytesIO(head + bytes(2 * tar.BLOCK))) as archive:
            member = archive.next()  # the first one, read when opening
            assert member is not None and member.size == size and member.name == "nix/store/big"
