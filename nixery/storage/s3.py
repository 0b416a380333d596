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

Credentials come from boto3's standard chain (environment, shared files,
container and instance roles); this module reads no environment itself.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import quote

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from nixery.storage.base import (
    BlobLocation,
    BlobWriter,
    Storage,
    StorageError,
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
KNOWN_BLOBS_MAX = 50_000

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
        # digest -> size: blobs never change, and Nixery never deletes them.
        self._known: dict[str, int] = {}
        self._known_lock = threading.Lock()
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
            size = self._known.get(digest)
        if size is not None:
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
            self._known[digest] = size

    # -- documents ------------------------------------------------------

    def get_document(self, key: str) -> bytes | None:
        object_key = self._document_key(key)
        response = self._call(
            f"reading {object_key}",
            lambda: self.client.get_object(Bucket=self.bucket, Key=object_key),
            missing_ok=True,
        )
        if response is None:
            return None
        body = response["Body"]  # reading it whole checks the length
        try:
            return self._call(f"reading {object_key}", body.read)
        finally:
            body.close()

    def put_document(self, key: str, data: bytes) -> None:
        # A PUT replaces the whole object at once; readers see old or new.
        object_key = self._document_key(key)
        self._call(
            f"storing {object_key}",
            lambda: self.client.put_object(Bucket=self.bucket, Key=object_key, Body=data),
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
