"""Writing a built image out of storage, for use without a registry.

Three forms: an OCI image layout directory (`oci`), the same layout as a tar
file (`oci-archive`), and the tar file `docker save` writes
(`docker-archive`: `manifest.json`, the config, and uncompressed layers).
`podman load` reads both tar files, `docker load` the latter, and `umoci`
and `skopeo` the directory. Tar files are written under a temporary name
and renamed when complete, so a half-written archive never has the name
asked for. `write_sboms` puts the image's bills of materials next to it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from isal import igzip

from nixery.assembly.manifest import OCI_INDEX, Format, canonical_json
from nixery.errors import NixeryError
from nixery.images.model import BuiltImage
from nixery.images.referrers import sbom_files
from nixery.storage import Storage

FORMATS = ("oci", "oci-archive", "docker-archive")
REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
CHUNK = 1 << 20


class LayoutError(NixeryError):
    """The image cannot be written out (a blob is missing, the output is unusable)."""


@dataclass(frozen=True)
class ImageBlobs:
    """One image's manifest, config and layers as stored."""

    manifest: dict[str, Any]
    manifest_digest: str
    manifest_size: int
    manifest_type: str

    @property
    def config_digest(self) -> str:
        return str(self.manifest["config"]["digest"])

    @property
    def layer_digests(self) -> list[str]:
        return [str(layer["digest"]) for layer in self.manifest["layers"]]

    def digests(self) -> list[str]:
        return [self.manifest_digest, self.config_digest, *self.layer_digests]


def image_blobs(storage: Storage, image: BuiltImage, fmt: Format) -> ImageBlobs:
    descriptor = image.manifests[fmt.name]
    data = storage.read_blob(descriptor.digest)
    if data is None:
        raise LayoutError(f"manifest {descriptor.digest} is missing from storage")
    return ImageBlobs(json.loads(data), descriptor.digest, descriptor.size, descriptor.media_type)


def write(storage: Storage, image: BuiltImage, output: Path, fmt: str, name: str, tag: str) -> None:
    """Write `image` to `output` in format `fmt` (one of FORMATS)."""
    # A directory is addressed as DIR:TAG (umoci, skopeo); a loaded archive
    # is named after its reference, under localhost/ as podman names local images.
    reference = f"localhost/{name}:{tag}"
    if fmt == "oci":
        write_oci_layout(storage, image, output, tag)
    elif fmt == "oci-archive":
        with _atomic_tar(output) as tar:
            _oci_archive(storage, image, tar, reference)
    elif fmt == "docker-archive":
        with _atomic_tar(output) as tar:
            _docker_archive(storage, image, tar, reference)
    else:
        raise LayoutError(f"unknown output format {fmt!r}; known: {', '.join(FORMATS)}")


def write_sboms(storage: Storage, image: BuiltImage, output: Path, fmt: str) -> list[Path]:
    """Write the SBOMs of the manifest that `output` (written in `fmt`) holds
    next to it, as `<output>.spdx.json` and `<output>.cdx.json`."""
    dialect = Format.DOCKER if fmt == "docker-archive" else Format.OCI
    index = image.referrers.get(dialect.name)
    if index is None:
        raise LayoutError("the image has no SBOMs; build it again")
    written = []
    for filename, blob in sbom_files(storage, index):
        # `sbom.spdx.json` -> `<output>.spdx.json`
        target = output.with_name(output.name + "." + filename.removeprefix("sbom."))
        _copy_blob(storage, blob.digest, target)
        written.append(target)
    return written


def write_oci_layout(storage: Storage, image: BuiltImage, directory: Path, tag: str) -> None:
    """Add the image to an OCI layout directory, tagged `tag` (replacing any
    image with that tag; other tagged images stay)."""
    blobs = image_blobs(storage, image, Format.OCI)
    blob_dir = directory / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    for digest in blobs.digests():
        target = blob_dir / digest.removeprefix("sha256:")
        if not target.exists():
            _copy_blob(storage, digest, target)
    index_path = directory / "index.json"
    _write_atomic(directory / "oci-layout", lambda fh: fh.write(OCI_LAYOUT))
    index = _index(blobs, tag, _existing_manifests(index_path, tag))
    _write_atomic(index_path, lambda fh: fh.write(index))


def _index(blobs: ImageBlobs, tag: str, others: list[dict[str, Any]]) -> bytes:
    entry = {
        "mediaType": blobs.manifest_type,
        "digest": blobs.manifest_digest,
        "size": blobs.manifest_size,
        "annotations": {REF_NAME: tag},
    }
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*others, entry]}
    return canonical_json(body)


def _existing_manifests(index_path: Path, tag: str) -> list[dict[str, Any]]:
    try:
        index = json.loads(index_path.read_bytes())
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise LayoutError(f"{index_path} is not a valid index: {exc}") from exc
    return [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag]


def _oci_archive(storage: Storage, image: BuiltImage, tar: tarfile.TarFile, reference: str) -> None:
    blobs = image_blobs(storage, image, Format.OCI)
    _add_bytes(tar, "oci-layout", OCI_LAYOUT)
    _add_bytes(tar, "index.json", _index(blobs, reference, []))
    _add_dir(tar, "blobs")
    _add_dir(tar, "blobs/sha256")
    for digest in blobs.digests():
        _add_blob(tar, f"blobs/sha256/{digest.removeprefix('sha256:')}", storage, digest)


def _docker_archive(
    storage: Storage, image: BuiltImage, tar: tarfile.TarFile, repo_tag: str
) -> None:
    blobs = image_blobs(storage, image, Format.DOCKER)
    config_name = blobs.config_digest.removeprefix("sha256:") + ".json"
    _add_blob(tar, config_name, storage, blobs.config_digest)
    config = json.loads(_read_blob(storage, blobs.config_digest))
    diff_ids = config["rootfs"]["diff_ids"]
    layer_names = []
    for digest, diff_id in zip(blobs.layer_digests, diff_ids, strict=True):
        layer_name = diff_id.removeprefix("sha256:") + ".tar"
        if layer_name not in layer_names:
            _add_uncompressed(tar, layer_name, storage, digest)
        layer_names.append(layer_name)
    manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
    _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())


# -- tar and file helpers ---------------------------------------------------


@contextmanager
def _atomic_tar(output: Path) -> Iterator[tarfile.TarFile]:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                yield tar
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, fill: Callable[[IO[bytes]], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _entry(name: str, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    info.uid = info.gid = 0
    return info


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = _entry(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(info)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_entry(name, len(data)), io.BytesIO(data))


def _open_blob(storage: Storage, digest: str) -> BinaryIO:
    fh = storage.open_blob(digest)
    if fh is None:
        raise LayoutError(f"blob {digest} is missing from storage")
    return fh


def _copy_blob(storage: Storage, digest: str, target: Path) -> None:
    with _open_blob(storage, digest) as src:
        _write_atomic(target, lambda fh: shutil.copyfileobj(src, fh, CHUNK))


def _read_blob(storage: Storage, digest: str) -> bytes:
    with _open_blob(storage, digest) as fh:
        return fh.read()


def _add_blob(tar: tarfile.TarFile, name: str, storage: Storage, digest: str) -> None:
    location = storage.locate_blob(digest)
    if location is None:
        raise LayoutError(f"blob {digest} is missing from storage")
    with _open_blob(storage, digest) as fh:
        tar.addfile(_entry(name, location.size), fh)


def _add_uncompressed(tar: tarfile.TarFile, name: str, storage: Storage, digest: str) -> None:
    """Add a gzipped layer uncompressed; tar needs its size first, so it is
    inflated to a temporary file."""
    with tempfile.TemporaryFile() as tmp, _open_blob(storage, digest) as fh:
        with igzip.GzipFile(fileobj=fh, mode="rb") as gz:
            shutil.copyfileobj(gz, tmp, CHUNK)
        size = tmp.tell()
        tmp.seek(0)
        tar.addfile(_entry(name, size), tmp)
