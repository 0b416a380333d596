"""Blobs and documents in an S3 bucket (AWS, Ceph RGW, MinIO, R2, GCS...).

Layout under the key prefix: `blobs/sha256/<hex>`, `documents/<key>`, and
`uploads/<random>` for large blobs being written.

A blob's digest is known only once its last byte is written, so a large
blob is streamed as a multipart upload to a temporary key under `uploads/`
(parts of `part_size` bytes, a few in flight while the packer goes on).
When the upload is complete the object is copied server-side to its blob
key and the temporary object is deleted. An S3 copy publishes the whole
object at once, and an unfinished multipart upload is never visible, so
nothing partial ever appears under a blob key, whatever happens to the
process. A blob smaller than one part is sent as a single PUT straight to
its blob key, which is just as atomic. What a killed process leaves behind
lies under `uploads/` only (see the lifecycle rule in the deployment guide).

Use marks: S3 cannot change an object's LastModified without rewriting it,
so marking an entry used (for `nixery gc`) puts an empty object at
`marks/blobs/sha256/<hex>` or `marks/documents/<key>`, whose LastModified
is the time of the mark; each process writes one at most every
`mark_interval` seconds per entry. Listings report an entry's time as the
later of its own and its mark's; deleting an entry deletes its mark.

Leases (see `Storage.acquire_lease`) are small objects under `leases/`,
written with conditional PUTs: `If-None-Match: *` to take a free one,
`If-Match: <ETag>` to renew one or to take over an expired one, so of two
replicas racing for the same lease exactly one wins (the other gets `412
Precondition Failed`). A store that ignores these headers is found out at
the first lease (a probe object written twice); its leases are then granted
to everyone, and work may be done twice (harmlessly: see `Storage`).

Credentials come from boto3's standard chain (environment, shared files,
container and instance roles); this module reads no environment itself.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import quote

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from nixery.storage.base import (
    KEY,
    MARK_INTERVAL,
    SHA256_DIGEST,
    BlobLocation,
    BlobWriter,
    Entry,
    Lease,
    Storage,
    StorageError,
    parse_lease,
    validate_digest,
    validate_key,
)

log = logging.getLogger(__name__)

MIB = 1 << 20
MIN_PART_SIZE = 5 * MIB  # S3's minimum for every part but the last
DEFAULT_PART_SIZE = 8 * MIB
MAX_PARTS = 10_000
# A single CopyObject takes up to 5 GiB; boto3 switches to a multipart copy above.
COPY_CONFIG = TransferConfig(multipart_threshold=5 * 1024 * MIB, multipart_chunksize=512 * MIB)
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
# A conditional write lost: the condition failed, or a concurrent one won.
CONDITION_FAILED = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
LEASES = "leases/"
KNOWN_BLOBS_MAX = 50_000
# How long a blob seen to exist is believed to: `nixery gc` may remove it
# later, and a stored image must then be noticed as incomplete and rebuilt.
KNOWN_BLOB_TTL = 60.0
MARKS = "marks/"
LIST_PAGE_SIZE = 1000  # the most one ListObjectsV2 page may hold

T = TypeVar("T")


class S3Storage(Storage):
    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        redirect: bool = True,
        presign_expiry: int = 900,
        public_base_url: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        parts_in_flight: int = 2,
        upload_threads: int = 8,
        mark_interval: float = MARK_INTERVAL,
        list_page_size: int = LIST_PAGE_SIZE,
    ):
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 parts must be at least {MIN_PART_SIZE} bytes")
        self.bucket = bucket
        self.prefix = _normalise_prefix(prefix)
        self.redirect = redirect
        self.presign_expiry = presign_expiry
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.part_size = part_size
        self.parts_in_flight = max(1, parts_in_flight)
        self.mark_interval = mark_interval
        self.list_page_size = list_page_size
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if path_style else "auto"},
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=64,
            connect_timeout=10,
            read_timeout=60,
        )
        # Clients are thread-safe; sessions are not, so make one just for this.
        session = boto3.session.Session()
        self.client = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self._uploads = ThreadPoolExecutor(upload_threads, thread_name_prefix="s3-upload")
        # digest -> (size, believed until): blobs never change, but gc may delete them.
        self._known: dict[str, tuple[int, float]] = {}
        self._known_lock = threading.Lock()
        # object key -> when this process last wrote or marked it (monotonic).
        self._marked: dict[str, float] = {}
        # mark key -> mark time, for marks the last listings found no entry for.
        self._orphans: dict[str, float] = {}
        self._exclusive: bool | None = None  # whether conditional writes work
        self._quote_etags = True  # how If-Match wants an ETag
        self._conditional_delete = False  # whether DELETE honours If-Match
        self._call("checking bucket " + bucket, lambda: self.client.head_bucket(Bucket=bucket))

    # -- keys -----------------------------------------------------------

    def object_key(self, name: str) -> str:
        return self.prefix + name

    def blob_key(self, digest: str) -> str:
        return self.object_key("blobs/sha256/" + validate_digest(digest))

    def _document_key(self, key: str) -> str:
        return self.object_key("documents/" + validate_key(key))

    # -- blobs ----------------------------------------------------------

    def blob_writer(self) -> BlobWriter:
        return _S3BlobWriter(self)

    def locate_blob(self, digest: str) -> BlobLocation | None:
        size = self._blob_size(digest)
        if size is None:
            return None
        key = self.blob_key(digest)
        if self.public_base_url:
            return BlobLocation(size=size, url=f"{self.public_base_url}/{quote(key)}")
        if self.redirect:
            url = self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=self.presign_expiry,
            )
            return BlobLocation(size=size, url=url)
        return BlobLocation(size=size)  # neither path nor URL: stream it through us

    def open_blob(self, digest: str) -> BinaryIO | None:
        return self._get_blob(digest, {})

    def open_blob_range(self, digest: str, start: int, end: int) -> BinaryIO | None:
        if end <= start:  # nothing to read (an empty blob)
            return self._get_blob(digest, {})
        return self._get_blob(digest, {"Range": f"bytes={start}-{end - 1}"})

    def _get_blob(self, digest: str, extra: dict[str, str]) -> BinaryIO | None:
        key = self.blob_key(digest)
        response = self._call(
            f"reading {key}",
            lambda: self.client.get_object(Bucket=self.bucket, Key=key, **extra),
            missing_ok=True,
        )
        return None if response is None else cast(BinaryIO, response["Body"])

    def _blob_size(self, digest: str) -> int | None:
        with self._known_lock:
            size, until = self._known.get(digest, (None, 0.0))
        if size is not None and until > time.monotonic():
            return size
        key = self.blob_key(digest)
        head = self._call(
            f"looking up {key}",
            lambda: self.client.head_object(Bucket=self.bucket, Key=key),
            missing_ok=True,
        )
        if head is None:
            return None
        self._remember(digest, int(head["ContentLength"]))
        return int(head["ContentLength"])

    def _remember(self, digest: str, size: int) -> None:
        with self._known_lock:
            if len(self._known) >= KNOWN_BLOBS_MAX:
                self._known.clear()
            self._known[digest] = (size, time.monotonic() + KNOWN_BLOB_TTL)

    # -- documents ------------------------------------------------------

    def get_document(self, key: str) -> bytes | None:
        found = self._read_object(self._document_key(key))
        return None if found is None else found[0]

    def _read_object(self, object_key: str) -> tuple[bytes, str] | None:
        """A whole object and its ETag; None if there is none."""
        response = self._call(
            f"reading {object_key}",
            lambda: self.client.get_object(Bucket=self.bucket, Key=object_key),
            missing_ok=True,
        )
        if response is None:
            return None
        body = response["Body"]  # reading it whole checks the length
        try:
            return self._call(f"reading {object_key}", body.read), str(response["ETag"])
        finally:
            body.close()

    def put_document(self, key: str, data: bytes) -> None:
        # A PUT replaces the whole object at once; readers see old or new.
        object_key = self._document_key(key)
        self._call(
            f"storing {object_key}",
            lambda: self.client.put_object(Bucket=self.bucket, Key=object_key, Body=data),
        )
        self._due_for_mark(object_key)  # as good as a mark

    # -- leases ---------------------------------------------------------

    def _lease_key(self, key: str) -> str:
        return self.object_key(LEASES + validate_key(key))

    def leases_exclusive(self) -> bool:
        with self._known_lock:
            if self._exclusive is not None:
                return self._exclusive
        exclusive = self._probe_conditional_writes()
        with self._known_lock:
            self._exclusive = exclusive
        return exclusive

    def _probe_conditional_writes(self) -> bool:
        """Find out how this store treats conditional writes, with a probe
        object: a second `If-None-Match: *` PUT must be refused, and an
        `If-Match` PUT must succeed with the current ETag (quoted as S3
        specifies, or bare, as Ceph RGW before Reef compares it) and fail
        with another. A conditional DELETE is used only if it is honoured."""
        probe = self.object_key(f"{LEASES}probe/{uuid.uuid4().hex}")
        try:
            first = self._put_if(probe, b"1", IfNoneMatch="*")
            second = self._put_if(probe, b"2", IfNoneMatch="*")
            wrong = self._put_if(probe, b"3", IfMatch=f'"{uuid.uuid4().hex}"')
            matched = None
            if first is not None:
                for quoted in (True, False):
                    self._quote_etags = quoted
                    matched = self._put_if(probe, b"4", IfMatch=self._etag(first))
                    if matched is not None:
                        break
            if matched is not None:
                self._delete_if(probe, f'"{uuid.uuid4().hex}"')
                self._conditional_delete = self._head(probe) is not None
        except StorageError as exc:
            log.warning("s3://%s refuses conditional writes (%s)", self.bucket, exc)
            return False
        finally:
            self._delete_object(probe)
        if first is None or second is not None or wrong is not None or matched is None:
            log.warning(
                "s3://%s ignores conditional writes: replicas cannot share builds,"
                " so each may build the same image (see docs/operating.md)",
                self.bucket,
            )
            return False
        return True

    def _etag(self, etag: str) -> str:
        bare = etag.strip('"')
        return f'"{bare}"' if self._quote_etags else bare

    def _head(self, object_key: str) -> dict[str, Any] | None:
        return self._call(
            f"looking up {object_key}",
            lambda: self.client.head_object(Bucket=self.bucket, Key=object_key),
            missing_ok=True,
        )

    def _put_if(self, object_key: str, body: bytes, **condition: str) -> str | None:
        """PUT under a condition; the new ETag, or None if the condition failed."""
        try:
            response = self.client.put_object(
                Bucket=self.bucket, Key=object_key, Body=body, **condition
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in CONDITION_FAILED or status in CONDITION_FAILED or code in NOT_FOUND:
                return None
            raise StorageError(f"writing {object_key} in s3://{self.bucket} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"writing {object_key} in s3://{self.bucket} failed: {exc}") from exc
        return str(response["ETag"])

    def read_lease(self, key: str) -> Lease | None:
        if not self.leases_exclusive():
            return None
        found = self._read_object(self._lease_key(key))
        return None if found is None else parse_lease(key, *found)

    def acquire_lease(self, key: str, holder: str, ttl: float) -> Lease | None:
        if not self.leases_exclusive():
            return super().acquire_lease(key, holder, ttl)
        object_key = self._lease_key(key)
        for _ in range(3):  # the lease may come and go between our requests
            lease = Lease(key, holder, self.clock() + ttl, "")
            etag = self._put_if(object_key, lease.to_json(), IfNoneMatch="*")
            if etag is not None:
                return replace(lease, token=etag)
            current = self.read_lease(key)
            if current is None:
                continue  # released in between: try again
            if current.expires > self.clock():
                return None
            # Expired: take it over, unless someone else does first.
            etag = self._put_if(object_key, lease.to_json(), IfMatch=self._etag(current.token))
            return None if etag is None else replace(lease, token=etag)
        return None

    def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        if not self.leases_exclusive():
            return super().renew_lease(lease, ttl)
        renewed = replace(lease, expires=self.clock() + ttl)
        etag = self._put_if(
            self._lease_key(lease.key), renewed.to_json(), IfMatch=self._etag(lease.token)
        )
        return None if etag is None else replace(renewed, token=etag)

    def release_lease(self, lease: Lease) -> None:
        if not self.leases_exclusive():
            return
        object_key = self._lease_key(lease.key)
        # Expire it with a conditional write, so a lease someone else has
        # taken over meanwhile is never touched; then remove it where the
        # store deletes conditionally too. An expired lease left behind is
        # harmless: the next taker overwrites it.
        expired = replace(lease, expires=0.0)
        etag = self._put_if(object_key, expired.to_json(), IfMatch=self._etag(lease.token))
        if etag is not None and self._conditional_delete:
            self._delete_if(object_key, etag)

    def _delete_if(self, object_key: str, etag: str) -> None:
        """Delete `object_key` if its ETag is still `etag` (where honoured)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=object_key, IfMatch=self._etag(etag))
        except ClientError as exc:
            log.debug("left the expired lease %s: %s", object_key, exc)
        except BotoCoreError as exc:
            log.debug("left the expired lease %s: %s", object_key, exc)

    # -- use marks and garbage collection -------------------------------

    def _mark_key(self, object_key: str) -> str:
        return self.object_key(MARKS + object_key[len(self.prefix) :])

    def _due_for_mark(self, object_key: str) -> bool:
        """Whether to mark `object_key` now; if so, it counts as marked."""
        now = time.monotonic()
        with self._known_lock:
            last = self._marked.get(object_key)
            if last is not None and last > now - self.mark_interval:
                return False
            if len(self._marked) >= KNOWN_BLOBS_MAX:
                self._marked.clear()
            self._marked[object_key] = now
        return True

    def mark_used(self, key: str | None = None, *digests: str) -> None:
        keys = [self._document_key(key)] if key else []
        keys += [self.blob_key(d) for d in digests]
        for object_key in filter(self._due_for_mark, keys):
            try:
                self._put_mark(object_key)
            except StorageError as exc:
                log.warning("%s; gc judges it by its older time", exc)
                with self._known_lock:
                    self._marked.pop(object_key, None)

    def _put_mark(self, object_key: str) -> None:
        mark = self._mark_key(object_key)
        self._call(
            f"marking {object_key} used",
            lambda: self.client.put_object(Bucket=self.bucket, Key=mark, Body=b""),
        )

    def _list(self, prefix: str) -> Iterator[tuple[str, float, int]]:
        """(key without the storage prefix, LastModified, size) of each object under `prefix`."""
        full = self.object_key(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(
            paginator.paginate(
                Bucket=self.bucket,
                Prefix=full,
                PaginationConfig={"PageSize": self.list_page_size},
            )
        )
        while True:
            page = self._call(f"listing {full}", lambda: next(pages, None))
            if page is None:
                return
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) :]
                yield key, obj["LastModified"].timestamp(), int(obj["Size"])

    def _entries(self, prefix: str, name_of: Callable[[str], str | None]) -> Iterator[Entry]:
        """The entries under `prefix`, each dated by the later of its write and its mark.

        Marks are listed after the entries, so a mark made meanwhile counts."""
        found = {}
        for key, mtime, size in self._list(prefix):
            name = name_of(key)
            if name is not None:
                found[key] = Entry(name, mtime, size)
        marks = {key[len(MARKS) :]: mtime for key, mtime, _ in self._list(MARKS + prefix)}
        for key, marked in marks.items():
            if key not in found:
                self._orphans[MARKS + key] = marked
        for key, entry in found.items():
            yield Entry(entry.name, max(entry.mtime, marks.get(key, 0.0)), entry.size)

    def list_blobs(self) -> Iterator[Entry]:
        # Only finished blobs: uploads in progress live under uploads/.
        def digest(key: str) -> str | None:
            name = "sha256:" + key.rsplit("/", 1)[-1]
            return name if SHA256_DIGEST.fullmatch(name) else None

        return self._entries("blobs/sha256/", digest)

    def list_documents(self, prefix: str) -> Iterator[Entry]:
        def document(key: str) -> str | None:
            name = key[len("documents/") :]
            return name if KEY.fullmatch(name) and ".." not in name else None

        return self._entries("documents/" + validate_key(prefix.rstrip("/")) + "/", document)

    def document_mtime(self, key: str) -> float | None:
        # Listed, not HEAD: a listing's LastModified is finer than a HEAD's.
        name = "documents/" + validate_key(key)
        written = self._listed_time(name)
        if written is None:
            return None
        return max(written, self._listed_time(MARKS + name) or 0.0)

    def _listed_time(self, key: str) -> float | None:
        return next((mtime for k, mtime, _ in self._list(key) if k == key), None)

    def delete_blob(self, digest: str) -> None:
        self._delete(self.blob_key(digest))
        with self._known_lock:
            self._known.pop(digest, None)

    def delete_document(self, key: str) -> None:
        self._delete(self._document_key(key))

    def _delete(self, object_key: str) -> None:
        """Delete an entry, then its mark (a mark without its entry is harmless)."""
        self._delete_object(object_key)
        self._delete_object(self._mark_key(object_key))
        with self._known_lock:
            self._marked.pop(object_key, None)

    def remove_orphan_marks(self, before: float) -> int:
        stale = [key for key, marked in self._orphans.items() if marked < before]
        for key in stale:
            self._delete_object(self.object_key(key))
        self._orphans.clear()
        return len(stale)

    def _delete_object(self, key: str) -> None:
        # Deleting a missing key succeeds: gc tolerates entries already gone.
        self._call(
            f"deleting {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=key)
        )

    # -- plumbing -------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T], missing_ok: bool = False) -> T:
        try:
            return fn()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if missing_ok and code in NOT_FOUND:
                return None  # type: ignore[return-value]
            raise StorageError(f"{what} in s3://{self.bucket} failed: {code} {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"{what} in s3://{self.bucket} failed: {exc}") from exc


class _S3BlobWriter(BlobWriter):
    """Buffers one part at a time; uploads parts in the background."""

    def __init__(self, storage: S3Storage):
        super().__init__()
        self._s = storage
        self._buffer = bytearray()
        self._temp_key: str | None = None
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._completed = False  # the temporary object exists
        self._finished = False

    def _write(self, data: bytes) -> None:
        if self._finished:
            raise StorageError("blob writer already finished")
        self._buffer += data
        size = self._s.part_size
        while len(self._buffer) >= size:
            with memoryview(self._buffer) as view:
                part = bytes(view[:size])
            del self._buffer[:size]
            self._send_part(part)

    def _send_part(self, data: bytes) -> None:
        s = self._s
        if self._upload_id is None:
            self._temp_key = s.object_key(f"uploads/{uuid.uuid4().hex}")
            created = s._call(
                f"starting an upload to {self._temp_key}",
                lambda: s.client.create_multipart_upload(
                    Bucket=s.bucket, Key=self._temp_key, ContentType="application/octet-stream"
                ),
            )
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            self.abort()
            raise StorageError(f"blob too large for {MAX_PARTS} parts of {s.part_size} bytes")
        self._wait_for_room()
        self._parts.append(s._uploads.submit(self._upload_part, number, data))

    def _wait_for_room(self) -> None:
        """Bound memory: at most `parts_in_flight` parts queued or uploading."""
        pending = [f for f in self._parts if not f.done()]
        while len(pending) >= self._s.parts_in_flight:
            _, not_done = wait(pending, return_when=FIRST_COMPLETED)
            pending = list(not_done)
        for done in self._parts:
            if done.done() and done.exception() is not None:
                self.abort()
                raise StorageError(f"uploading a part failed: {done.exception()}")

    def _upload_part(self, number: int, data: bytes) -> dict[str, Any]:
        s = self._s
        response = s._call(
            f"uploading part {number} of {self._temp_key}",
            lambda: s.client.upload_part(
                Bucket=s.bucket,
                Key=self._temp_key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
            ),
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _commit(self, digest: str) -> None:
        if self._finished:
            raise StorageError("blob writer already finished")
        s = self._s
        key = s.blob_key(digest)
        try:
            if self._upload_id is None:
                data = bytes(self._buffer)
                s._call(
                    f"storing {key}",
                    lambda: s.client.put_object(
                        Bucket=s.bucket, Key=key, Body=data, ContentType="application/octet-stream"
                    ),
                )
            else:
                self._publish(key)
        except BaseException:
            self.abort()
            raise
        self._finished = True
        self._buffer = bytearray()
        s._remember(digest, self.size)
        s._due_for_mark(key)

    def _publish(self, key: str) -> None:
        s = self._s
        if self._buffer:
            self._send_part(bytes(self._buffer))
            self._buffer = bytearray()
        parts = [f.result() for f in self._parts]
        s._call(
            f"completing {self._temp_key}",
            lambda: s.client.complete_multipart_upload(
                Bucket=s.bucket,
                Key=self._temp_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            ),
        )
        self._completed = True
        # Another replica may have published the same bytes already.
        exists = s._call(
            f"looking up {key}",
            lambda: s.client.head_object(Bucket=s.bucket, Key=key),
            missing_ok=True,
        )
        if exists is None:
            source = {"Bucket": s.bucket, "Key": self._temp_key}
            s._call(
                f"publishing {key}",
                lambda: s.client.copy(source, s.bucket, key, Config=COPY_CONFIG),
            )
        self._delete_temp()

    def _delete_temp(self) -> None:
        s = self._s
        s._call(
            f"deleting {self._temp_key}",
            lambda: s.client.delete_object(Bucket=s.bucket, Key=self._temp_key),
        )
        self._completed = False

    def abort(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._buffer = bytearray()
        for future in self._parts:
            future.cancel()
        wait(self._parts)
        s = self._s
        try:
            if self._completed:
                self._delete_temp()
            elif self._upload_id is not None:
                s._call(
                    f"aborting the upload to {self._temp_key}",
                    lambda: s.client.abort_multipart_upload(
                        Bucket=s.bucket, Key=self._temp_key, UploadId=self._upload_id
                    ),
                )
        except StorageError as exc:
            # Left for the bucket's lifecycle rule; it is under uploads/ only.
            log.warning("cleaning up an abandoned upload failed: %s", exc)


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    return validate_key(prefix) + "/"
