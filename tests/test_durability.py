"""The order of fsyncs and renames of a real build into real storage.

A killed process cannot show what a power cut would lose (the page cache
survives it; see test_crash_safety.py for kill -9), so this test records the
real calls as they happen: an image record may only be renamed into place
once every blob it references is durable, data and directory entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nixery.images.model import BuildSettings, BuiltImage
from nixery.images.service import ImageService
from nixery.packages.names import parse_image_name
from nixery.packages.nix import Nix
from nixery.packages.sources import SourceConfig, Sources
from nixery.storage import FilesystemStorage
from tests.conftest import FIXTURE_PKGS

pytestmark = pytest.mark.nix


def test_an_image_record_is_stored_after_its_blobs_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FilesystemStorage(tmp_path)
    events: list[tuple[str, str]] = []  # ("fsync", path), ("rename", destination)
    sources: dict[int, str] = {}  # the temp file of each rename, by event index
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_replace(src, dst)
        sources[len(events)] = os.path.realpath(src)
        events.append(("rename", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    nix = Nix(timeout=600)
    service = ImageService(
        storage, nix, Sources(SourceConfig("path", str(FIXTURE_PKGS)), nix), BuildSettings()
    )
    source = service.sources.resolve("latest")
    built = service.image(parse_image_name("curl"), source, service.settings.platforms[0])
    monkeypatch.undo()

    blob_dir = os.path.realpath(storage.blob_dir)
    blobs = [p for kind, p in events if kind == "rename" and p.startswith(str(storage.blob_dir))]
    records = [p for kind, p in events if kind == "rename" and "/documents/images/" in p]
    assert len(records) == 1 and len(blobs) >= len(built.layers) + 4  # configs, manifests
    record_at = events.index(("rename", records[0]))
    last_blob_at = max(at for at, event in enumerate(events) if event[1] in blobs)
    # Every blob's data was synced before its rename, then the directory
    # once after the last rename and before the record.
    for at, (kind, path) in enumerate(events):
        if kind == "rename" and path in blobs:
            assert ("fsync", sources[at]) in events[:at], path
    assert ("fsync", blob_dir) in events[last_blob_at:record_at]
    # The record itself is durable: its data before the rename, its directory after.
    assert ("fsync", sources[record_at]) in events[:record_at]
    assert ("fsync", os.path.realpath(os.path.dirname(records[0]))) in events[record_at:]
    # Layer records are cache entries: no fsync. In all, one sync per blob and a
    # few per image, where each blob and layer record used to take two; the
    # referrers records (a manifest's SBOMs) are durable like the image's own.
    syncs = [p for kind, p in events if kind == "fsync"]
    assert not [p for p in syncs if "/documents/layers/" in p or p.endswith("/layers")]
    referrers = [p for kind, p in events if kind == "rename" and "/documents/referrers/" in p]
    assert len(referrers) == len(built.manifests)
    assert len(syncs) <= len(blobs) + 3 + 2 * len(referrers)

    # What was stored reads back as the same image.
    stored = storage.get_document(records[0].split("/documents/", 1)[1])
    assert stored is not None
    assert BuiltImage.from_json(json.loads(stored)) == built
    storage.close()
