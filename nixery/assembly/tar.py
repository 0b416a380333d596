"""Tar headers for reproducible layers, built directly.

Layers hold only directories, symlinks and regular files with numeric
owners (0:0 unless the caller says otherwise), empty owner names and one
fixed mtime. For those, this module writes
the same bytes as `tarfile`'s PAX format: a ustar header, preceded by a pax
extended header (`x`) when a name or link target is longer than 100 bytes
or not ASCII, or a size needs more than 11 octal digits. Building headers
here is several times cheaper per entry than going through `TarInfo`
(which matters for closures of tens of thousands of small files), and it
pins the layer bytes to this code rather than to the Python version.

Names are bytes, as the file system gives them.
"""

from __future__ import annotations

BLOCK = 512
RECORD = 20 * BLOCK  # the archive's length is a multiple of this
DIRECTORY = b"5"
SYMLINK = b"2"
REGULAR = b"0"
_PAX = b"x"
_MAGIC = b"ustar\x0000"
_NAME_MAX = 100
_SIZE_MAX = 8**11 - 1  # 11 octal digits
_ZERO_ID = b"0000000\x00"
_ROOT_OWNER = (_ZERO_ID, _ZERO_ID)
_ID_MAX = 8**7 - 1  # 7 octal digits
_TAIL = bytes(32 + 32 + 8 + 8 + 155 + 12)  # uname, gname, devmajor, devminor, prefix, pad


def header(
    name: bytes,
    kind: bytes,
    mode: int,
    mtime: int,
    size: int = 0,
    link: bytes = b"",
    uid: int = 0,
    gid: int = 0,
) -> bytes:
    """The header block(s) of one entry; a directory's name gets its `/` here."""
    if kind == DIRECTORY and not name.endswith(b"/"):
        name += b"/"
    records = []
    if _needs_pax(name):
        records.append((b"path", name))
    if _needs_pax(link):
        records.append((b"linkpath", link))
    if size > _SIZE_MAX:
        records.append((b"size", b"%d" % size))
        size = 0
    out = _pax(records) if records else b""
    owner = (_id(uid), _id(gid)) if uid or gid else _ROOT_OWNER
    return out + _ustar(_ascii(name), kind, mode & 0o7777, size, mtime, _ascii(link), owner)


def padding(size: int) -> bytes:
    """NULs that complete a member's data to a whole block."""
    return bytes(-size % BLOCK)


def end(offset: int) -> bytes:
    """The end of an archive whose members took `offset` bytes: two zero
    blocks, then zeros up to a whole record."""
    offset += 2 * BLOCK
    return bytes(2 * BLOCK + (-offset % RECORD))


def _needs_pax(value: bytes) -> bool:
    return len(value) > _NAME_MAX or not value.isascii()


def _ascii(value: bytes) -> bytes:
    """What fits the ustar field: ASCII, one `?` per other character."""
    if value.isascii():
        return value
    return value.decode("utf-8", "surrogateescape").encode("ascii", "replace")


def _field(value: bytes, length: int) -> bytes:
    return value[:length].ljust(length, b"\x00")


def _id(value: int) -> bytes:
    if not 0 <= value <= _ID_MAX:
        raise ValueError(f"a uid or gid of {value} does not fit a ustar header")
    return b"%07o\x00" % value


def _ustar(
    name: bytes,
    kind: bytes,
    mode: int,
    size: int,
    mtime: int,
    link: bytes,
    owner: tuple[bytes, bytes] = _ROOT_OWNER,
) -> bytes:
    block = b"".join((
        _field(name, 100), b"%07o\x00" % mode, owner[0], owner[1], b"%011o\x00" % size,
        b"%011o\x00" % mtime, b"        ", kind, _field(link, 100), _MAGIC, _TAIL,
    ))  # fmt: skip
    # The checksum counts its own field as eight spaces; six digits, NUL, space.
    return block[:148] + b"%06o\x00" % sum(block) + block[155:]


def _pax(records: list[tuple[bytes, bytes]]) -> bytes:
    """A pax extended header: a ustar `x` block, then `LEN key=value\\n` records."""
    body = b""
    if not all(_is_utf8(value) for _, value in records):
        body += b"21 hdrcharset=BINARY\n"
    for key, value in records:
        body += _record(key, value)
    head = _ustar(b"././@PaxHeader", _PAX, 0, len(body), 0, b"")
    return head + body + padding(len(body))


def _record(key: bytes, value: bytes) -> bytes:
    # LEN counts the whole record, its own digits included.
    rest = len(key) + len(value) + 3  # space, '=', newline
    length = rest + len(str(rest))
    length = rest + len(str(length))
    return b"%d %s=%s\n" % (length, key, value)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
