"""Storage backends: content-addressed blobs plus small metadata documents.

Storage knows nothing of images: it stores bytes under their sha256 digest
and JSON-ish documents under validated keys.
"""

from nixery.storage.base import (
    BlobLocation,
    BlobWriter,
    Entry,
    Storage,
    StorageError,
    validate_key,
)
from nixery.storage.filesystem import FilesystemStorage

__all__ = [
    "BlobLocation",
    "BlobWriter",
    "Entry",
    "FilesystemStorage",
    "Storage",
    "StorageError",
    "validate_key",
]
