"""Stored images and manifests kept in memory for warm requests.

A warm pull asks for the same manifest again and again; checking the image
in storage every time (its record read and parsed, every blob it references
located) is work whose answer rarely changes. An image checked in storage is
kept here with the blobs it references, and served without asking storage
again for `revalidate` seconds; the first request after that checks storage
again (meanwhile the others go on with what is kept). A manifest's bytes are
kept by digest, as content-addressed bytes never change. Each request
still marks what it uses (`Storage.mark_used`, a stat at most), as garbage
collection judges by the marks.

What could change is a blob's existence (garbage collection, an operator, a
damaged file). A blob request that finds a blob missing drops every kept
image that references it, so the next manifest request checks storage and
rebuilds what is lost; and nothing is kept unchecked longer than
`revalidate`, far less than garbage collection's grace period (an hour by
default), after which an expired image's blobs may go.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from cachetools import LRUCache

from nixery.assembly.manifest import Document
from nixery.images.model import BuiltImage

T = TypeVar("T")

REVALIDATE = 5.0  # seconds an image or manifest is served without asking storage
MAX_IMAGES = 1024  # a manifest of 100 layers is about 20 kB in both dialects
MAX_DOCUMENTS = 2 * MAX_IMAGES


@dataclass
class _Kept(Generic[T]):
    value: T
    digests: frozenset[str]  # blobs it references (itself included)
    checked: float  # when storage was last asked (or is being asked)


class ServedImages:
    """Checked images by storage key and manifests by digest, bounded (LRU)."""

    def __init__(self, revalidate: float = REVALIDATE, clock: Callable[[], float] = time.monotonic):
        self.revalidate = revalidate
        self._clock = clock
        self._lock = threading.Lock()
        self._images: LRUCache[str, _Kept[BuiltImage]] = LRUCache(MAX_IMAGES)
        self._documents: LRUCache[str, _Kept[Document]] = LRUCache(MAX_DOCUMENTS)

    def image(self, key: str) -> BuiltImage | None:
        """The image kept under `key`, unless storage is due to be asked."""
        return self._fresh(self._images, key)

    def keep_image(self, key: str, image: BuiltImage, digests: Iterable[str]) -> None:
        with self._lock:
            self._images[key] = _Kept(image, frozenset(digests), self._clock())

    def document(self, digest: str) -> Document | None:
        """The manifest or index stored as `digest`, unless storage is due."""
        return self._fresh(self._documents, digest)

    def keep_document(self, document: Document, digests: Iterable[str] = ()) -> None:
        with self._lock:
            kept = frozenset((document.digest, *digests))
            self._documents[document.digest] = _Kept(document, kept, self._clock())

    def blob_missing(self, digest: str) -> None:
        """Forget whatever references `digest`: storage no longer has it."""
        with self._lock:
            for cache in (self._images, self._documents):
                for key in [k for k, kept in cache.items() if digest in kept.digests]:
                    del cache[key]

    def _fresh(self, cache: LRUCache[str, _Kept[T]], key: str) -> T | None:
        now = self._clock()
        with self._lock:
            kept = cache.get(key)
            if kept is None:
                return None
            if now - kept.checked >= self.revalidate:
                # This caller asks storage; others keep being served meanwhile.
                kept.checked = now
                return None
            return kept.value
