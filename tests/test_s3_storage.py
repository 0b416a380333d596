"""The S3 backend against a real S3 server (Ceph RGW), without Nix."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import botocore.auth
import pytest

from nixery.storage.base import StorageError
from nixery.storage.s3 import MIB, S3Storage
from tests.s3server import S3Server

# Starts a real S3 server, so it runs with the end-to-end tests.
pytestmark = pytest.mark.e2e

PART = 5 * MIB


@pytest.fixture
def bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    # The backend takes its credentials from the standard AWS chain.
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server.new_bucket()


def storage(s3_server: S3Server, bucket: str, **kwargs: object) -> S3Storage:
    kwargs.setdefault("part_size", PART)
    return S3Storage(bucket, endpoint_url=s3_server.endpoint, path_style=True, **kwargs)  # type: ignore[arg-type]


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """The same pseudo-random bytes on every call, made as they are consumed."""
    rng = random.Random(total)
    for i in range(0, total, size):
        yield rng.randbytes(min(size, total - i))


def digest_of(parts: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return "sha256:" + h.hexdigest()


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_documents_round_trip_and_prefixes_isolate(s3_server: S3Server, bucket: str) -> None:
    a = storage(s3_server, bucket, prefix="/a/")
    b = storage(s3_server, bucket, prefix="b")
    assert a.get_document("images/x.json") is None
    a.put_document("images/x.json", b'{"v": 1}')
    a.put_document("images/x.json", b'{"v": 2}')
    assert a.get_document("images/x.json") == b'{"v": 2}'
    assert b.get_document("images/x.json") is None
    assert set(s3_server.keys(bucket)) == {"a/documents/images/x.json"}
    with pytest.raises(ValueError):
        a.put_document("../escape", b"")
    with pytest.raises(ValueError):
        a.locate_blob("sha256:../../etc")


def test_small_blob_is_one_put_and_redirects_to_a_presigned_url(
    s3_server: S3Server, bucket: str
) -> None:
    st = storage(s3_server, bucket, presign_expiry=600)
    digest = st.put_blob(b"hello blob")
    assert digest == "sha256:" + hashlib.sha256(b"hello blob").hexdigest()
    assert s3_server.keys(bucket) == {f"blobs/sha256/{digest[7:]}": 10}
    location = st.locate_blob(digest)
    assert location is not None and location.size == 10 and location.path is None
    assert location.url is not None and "X-Amz-Signature=" in location.url
    assert location.url.startswith(f"{s3_server.endpoint}/{bucket}/blobs/sha256/")
    # The URL alone grants access, and the server checks it.
    assert fetch(location.url) == (200, b"hello blob")
    sig = location.url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    forged = (
        location.url[:sig] + ("0" if location.url[sig] != "0" else "1") + location.url[sig + 1 :]
    )
    assert fetch(forged)[0] == 403
    assert fetch(location.url.split("?")[0])[0] == 403
    assert parse_qs(urlsplit(location.url).query)["X-Amz-Expires"] == ["600"]
    assert st.locate_blob("sha256:" + "0" * 64) is None
    assert st.read_blob("sha256:" + "0" * 64) is None


def test_presigned_urls_expire_after_the_configured_time(
    s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """URLs signed two minutes ago: the server refuses the one valid for one
    minute, and serves the one valid for ten. botocore reads the signing time
    from its own clock, which has no parameter; the test sets it back."""
    digest = storage(s3_server, bucket).put_blob(b"hello blob")
    current = botocore.auth.get_current_datetime
    monkeypatch.setattr(
        botocore.auth, "get_current_datetime",
        lambda *args, **kwargs: current(*args, **kwargs) - timedelta(minutes=2),
    )  # fmt: skip
    urls = {}
    for expiry in (60, 600):
        location = storage(s3_server, bucket, presign_expiry=expiry).locate_blob(digest)
        assert location is not None and location.url is not None
        assert parse_qs(urlsplit(location.url).query)["X-Amz-Expires"] == [str(expiry)]
        urls[expiry] = location.url
    assert fetch(urls[600]) == (200, b"hello blob")
    assert fetch(urls[60])[0] == 403, "the URL outlived --s3-presign-expiry"


def test_large_blob_is_streamed_in_parts_and_published_whole(
    s3_server: S3Server, bucket: str
) -> None:
    st = storage(s3_server, bucket)
    total = 23 * MIB + 12345
    with st.blob_writer() as writer:
        for chunk in chunks(total, 100_003):
            writer.write(chunk)
        # Parts went out while writing; nothing is under a blob key yet.
        assert s3_server.uploads_in_progress(bucket) != []
        assert s3_server.keys(bucket, "blobs/") == {}
        digest = writer.commit()
    assert digest == digest_of(chunks(total, 100_003))
    assert s3_server.keys(bucket) == {f"blobs/sha256/{digest[7:]}": total}
    assert s3_server.uploads_in_progress(bucket) == []
    assert s3_server.broken_blobs(bucket) == []
    assert st.read_blob(digest) == b"".join(chunks(total, 100_003))


def test_writer_memory_stays_near_a_few_parts(s3_server: S3Server, bucket: str) -> None:
    st = storage(s3_server, bucket, parts_in_flight=2)
    total = 64 * MIB
    tracemalloc.start()
    try:
        with st.blob_writer() as writer:
            for chunk in chunks(total):
                writer.write(chunk)
            writer.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Two parts in flight, one filling, plus copies made while sending.
    assert peak < 32 * MIB, f"peak {peak / MIB:.1f} MiB while writing {total / MIB:.0f} MiB"
    assert s3_server.broken_blobs(bucket) == []


@pytest.mark.parametrize("size", [1000, 12 * MIB])
def test_wrong_digest_or_abort_publishes_nothing(
    s3_server: S3Server, bucket: str, size: int
) -> None:
    st = storage(s3_server, bucket)
    with st.blob_writer() as writer:
        for chunk in chunks(size):
            writer.write(chunk)
        with pytest.raises(StorageError, match="does not match"):
            writer.commit("sha256:" + "1" * 64)
    with pytest.raises(RuntimeError), st.blob_writer() as writer:
        for chunk in chunks(size):
            writer.write(chunk)
        raise RuntimeError("the packer failed")
    assert s3_server.keys(bucket) == {}
    assert s3_server.uploads_in_progress(bucket) == []


def test_two_replicas_writing_the_same_blob_agree(s3_server: S3Server, bucket: str) -> None:
    replicas = [storage(s3_server, bucket), storage(s3_server, bucket)]
    total = 11 * MIB
    digests: list[str] = []
    errors: list[BaseException] = []

    def write(st: S3Storage) -> None:
        try:
            with st.blob_writer() as writer:
                for chunk in chunks(total, 50_000):
                    writer.write(chunk)
                digests.append(writer.commit())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len(set(digests)) == 1 and len(digests) == 2
    assert s3_server.keys(bucket) == {f"blobs/sha256/{digests[0][7:]}": total}
    assert s3_server.broken_blobs(bucket) == []


def test_proxy_mode_and_public_base_url(s3_server: S3Server, bucket: str) -> None:
    proxied = storage(s3_server, bucket, prefix="p", redirect=False)
    digest = proxied.put_blob(b"relayed")
    location = proxied.locate_blob(digest)
    assert location is not None and location.url is None and location.path is None
    assert location.size == 7
    fh = proxied.open_blob(digest)
    assert fh is not None
    with fh:
        assert fh.read() == b"relayed"

    cdn = storage(s3_server, bucket, prefix="p", public_base_url="https://cdn.example/x/")
    cdn_location = cdn.locate_blob(digest)
    assert cdn_location is not None
    assert cdn_location.url == f"https://cdn.example/x/p/blobs/sha256/{digest[7:]}"


def test_bad_credentials_or_bucket_fail_at_start(
    s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage(s3_server, "no-such-bucket")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match="checking bucket"):
        storage(s3_server, bucket)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "wrong"


# -- garbage collection support -----------------------------------------------------------


def test_listings_page_through_and_hold_finished_entries_only(
    s3_server: S3Server, bucket: str
) -> None:
    st = storage(s3_server, bucket, prefix="p", list_page_size=2, mark_interval=0)
    digests = {st.put_blob(f"blob {i}".encode()) for i in range(7)}
    for i in range(5):
        st.put_document(f"images/{i}.json", b"{}")
    st.put_document("layers/l.json", b"{}")
    st.mark_used("images/0.json", *sorted(digests)[:3])
    client = s3_server.client()
    # What else may lie in the bucket: an upload's temporary object, a foreign
    # key under blobs/, a multipart upload never completed.
    client.put_object(Bucket=bucket, Key="p/uploads/0123abcd", Body=b"blob 0")
    client.put_object(Bucket=bucket, Key="p/blobs/sha256/not-a-digest", Body=b"x")
    client.create_multipart_upload(Bucket=bucket, Key="p/blobs/sha256/" + "e" * 64)

    listed = list(st.list_blobs())
    assert sorted(e.name for e in listed) == sorted(digests)  # 4 pages, no marks
    assert all(e.size == 6 for e in listed)
    names = {e.name for e in st.list_documents("images/")}
    assert names == {f"images/{i}.json" for i in range(5)}
    assert {e.name for e in st.list_documents("layers")} == {"layers/l.json"}
    assert list(st.list_documents("expired/")) == []
    assert len(s3_server.keys(bucket, "p/marks/")) == 4


def test_marks_date_entries_and_go_with_them(s3_server: S3Server, bucket: str) -> None:
    st = storage(s3_server, bucket, mark_interval=0)
    digest = st.put_blob(b"layer")
    st.put_document("images/a.json", b"{}")
    written = {e.name: e.mtime for e in st.list_blobs()}[digest]
    assert st.document_mtime("images/a.json") == next(st.list_documents("images/")).mtime
    time.sleep(0.1)
    st.mark_used("images/a.json", digest)
    marked = {e.name: e.mtime for e in st.list_blobs()}[digest]
    assert marked > written
    entry = next(st.list_documents("images/"))
    assert st.document_mtime("images/a.json") == entry.mtime > written

    st.delete_blob(digest)
    st.delete_document("images/a.json")
    assert s3_server.keys(bucket) == {}
    assert st.locate_blob(digest) is None and st.document_mtime("images/a.json") is None
    st.delete_blob(digest)  # already gone: no error


def test_marks_are_throttled_per_process(s3_server: S3Server, bucket: str) -> None:
    st = storage(s3_server, bucket)  # the default interval: ten minutes
    digest = st.put_blob(b"layer")
    st.put_document("images/a.json", b"{}")
    st.mark_used("images/a.json", digest)  # just written: as good as marked
    assert s3_server.keys(bucket, "marks/") == {}
    other = storage(s3_server, bucket)  # another replica
    other.mark_used("images/a.json", digest)
    other.mark_used("images/a.json", digest)
    marks = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="marks/")["Contents"]
    assert sorted(m["Key"] for m in marks) == [
        f"marks/blobs/sha256/{digest[7:]}",
        "marks/documents/images/a.json",
    ]


def test_a_mark_left_without_its_entry_is_removed_by_gc(s3_server: S3Server, bucket: str) -> None:
    from nixery.ops.gc import collect

    st = storage(s3_server, bucket, mark_interval=0)
    digest = st.put_blob(b"layer")
    st.mark_used(None, digest)
    # The race gc cannot prevent: a replica marks a blob gc is removing.
    s3_server.client().delete_object(Bucket=bucket, Key=f"blobs/sha256/{digest[7:]}")
    collect(st, keep=3600, grace=3600, dry_run=True)
    assert s3_server.keys(bucket, "marks/") != {}
    report = collect(st, keep=3600, grace=3600)
    assert report.removed_marks == 0 and s3_server.keys(bucket, "marks/") != {}  # still new
    report = collect(st, keep=3600, grace=3600, now=time.time() + 7200)
    assert report.removed_marks == 1 and s3_server.keys(bucket) == {}
