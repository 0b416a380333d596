"""Garbage collection of the image cache (`nixery gc`).

Roots are the image documents (`images/...`): each names the manifests of a
built image and its layers. An image expires when it has been neither built
nor served for `keep` seconds (serving by tag marks its document used, and
serving by digest the manifest, or the manifests a list names; see
`Storage.mark_used`). Collection is safe while servers run:

1. Expired image documents become tombstones (`expired/images/...`). A
   request that read the document just before still finds every blob it
   names, because tombstones keep referencing their blobs for `grace`
   seconds; a request after that builds the image again.
2. Tombstones older than `grace` are dropped.
3. Blobs referenced by no image document or tombstone are removed if they
   were written or marked used more than `grace` seconds ago: builds in
   progress write their blobs before their image document, and mark the
   cached layers they reuse. Multi-platform lists of manifests are written
   when served and named by no document; one is kept while every manifest
   it lists is, because clients pin images by a list's digest.
4. Layer documents (a cache of packed layers, not roots) whose blob is gone
   are removed, and so are referrers documents (`referrers/...`, which
   find an image manifest's bills of materials) whose manifest is gone.
   The bills of materials are part of their image: its document names
   them, so their blobs are kept and freed with it.
5. Where marks are stored apart from what they mark (S3), a mark that a
   race left without its entry is removed once older than `grace`.

So the blobs of an expired image are freed by the first run at least
`grace` seconds after it expired. With no grace (only safe when no server
runs) there are no tombstones, and one run frees everything at once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from nixery.assembly.manifest import INDEX_TYPES, media_type_of, referenced_digests
from nixery.images.model import BuiltImage, Layer
from nixery.images.referrers import PREFIX as REFERRERS
from nixery.images.referrers import artifact_blobs, subject_of
from nixery.storage import Storage
from nixery.storage.base import Entry

log = logging.getLogger(__name__)

IMAGES = "images/"
EXPIRED = "expired/"
LAYERS = "layers/"
MAX_LIST_SIZE = 64 * 1024  # larger blobs are layers, never read as lists


@dataclass
class GcReport:
    expired_images: list[str] = field(default_factory=list)
    dropped_tombstones: list[str] = field(default_factory=list)
    removed_blobs: list[str] = field(default_factory=list)
    removed_layer_documents: list[str] = field(default_factory=list)
    removed_referrers_documents: list[str] = field(default_factory=list)
    removed_marks: int = 0  # use marks left behind by an entry removed meanwhile
    freed_bytes: int = 0
    kept_blobs: int = 0
    kept_bytes: int = 0

    def summary(self, dry_run: bool) -> str:
        verb = "would remove" if dry_run else "removed"
        return (
            f"{verb} {len(self.removed_blobs)} blobs ({self.freed_bytes} bytes), "
            f"expired {len(self.expired_images)} images, "
            f"dropped {len(self.dropped_tombstones)} tombstones, "
            f"{len(self.removed_layer_documents)} layer documents and "
            f"{len(self.removed_referrers_documents)} referrers documents; "
            f"kept {self.kept_blobs} blobs ({self.kept_bytes} bytes)"
        )


def parse_image(data: bytes) -> BuiltImage | None:
    """An image document, or None if it is not one (gc skips what it cannot read)."""
    try:
        return BuiltImage.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError):
        return None


def image_references(storage: Storage, data: bytes) -> set[str]:
    """Every blob an image document needs: manifests, their configs, layers."""
    return needed_blobs(storage, parse_image(data))


def needed_blobs(storage: Storage, image: BuiltImage | None) -> set[str]:
    if image is None:
        return set()
    digests = {d.digest for d in image.manifests.values()}
    digests |= {layer.digest for layer in image.layers}
    for descriptor in image.manifests.values():
        digests.update(referenced_digests(storage.read_blob(descriptor.digest) or b""))
    for index in image.referrers.values():
        digests |= artifact_blobs(storage, index)
    return digests


def lists_kept_manifests(storage: Storage, blob: Entry, referenced: set[str]) -> bool:
    """Whether `blob` is a multi-platform list whose every manifest is kept."""
    if blob.size > MAX_LIST_SIZE:
        return False
    data = storage.read_blob(blob.name) or b""
    if media_type_of(data) not in INDEX_TYPES:
        return False
    listed = set(referenced_digests(data))
    return bool(listed) and listed <= referenced


def collect(
    storage: Storage,
    keep: float,
    grace: float,
    dry_run: bool = False,
    now: float | None = None,
) -> GcReport:
    now = time.time() if now is None else now
    report = GcReport()
    referenced: set[str] = set()
    # Listed first: a pull by digest marks the manifest, not the image document.
    blobs = {blob.name: blob for blob in storage.list_blobs()}

    for entry in list(storage.list_documents(IMAGES)):
        data = storage.get_document(entry.name)
        if data is None:
            continue
        image = parse_image(data)
        manifests = [d.digest for d in image.manifests.values()] if image else []
        pulled = [blobs[d].mtime for d in manifests if d in blobs]
        expired = max([entry.mtime, *pulled]) < now - keep
        if not expired or grace > 0:
            referenced |= needed_blobs(storage, image)  # kept, or a tombstone now
        if not expired:
            continue
        report.expired_images.append(entry.name)
        if dry_run or storage.document_mtime(entry.name) != entry.mtime:
            continue
        if grace > 0:
            storage.put_document(EXPIRED + entry.name, data)
        storage.delete_document(entry.name)

    for entry in list(storage.list_documents(EXPIRED)):
        if entry.mtime >= now - grace:
            referenced |= image_references(storage, storage.get_document(entry.name) or b"")
            continue
        report.dropped_tombstones.append(entry.name)
        if not dry_run:
            storage.delete_document(entry.name)

    for blob in blobs.values():
        if (
            blob.name in referenced
            or blob.mtime >= now - grace
            or lists_kept_manifests(storage, blob, referenced)
        ):
            report.kept_blobs += 1
            report.kept_bytes += blob.size
            continue
        report.removed_blobs.append(blob.name)
        report.freed_bytes += blob.size
        if not dry_run:
            storage.delete_blob(blob.name)

    present = blobs.keys() - set(report.removed_blobs)
    for entry in list(storage.list_documents(LAYERS)):
        data = storage.get_document(entry.name)
        try:
            digest = Layer.from_json(json.loads(data or b"")).digest
        except (ValueError, KeyError, TypeError):
            digest = None
        if digest not in present:
            report.removed_layer_documents.append(entry.name)
            if not dry_run:
                storage.delete_document(entry.name)

    for entry in list(storage.list_documents(REFERRERS)):
        if subject_of(entry.name) not in present:
            report.removed_referrers_documents.append(entry.name)
            if not dry_run:
                storage.delete_document(entry.name)

    if not dry_run:
        report.removed_marks = storage.remove_orphan_marks(now - grace)
    log.info("gc: %s", report.summary(dry_run))
    return report
