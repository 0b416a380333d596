"""Images that run as an unprivileged user: the `nonroot` meta-package.

The unit tests check the name, the root layer's entries and tar owners, and
the config; the end-to-end tests pull from a real server with podman and
containerd and run as that user.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from nixery.assembly import tar
from nixery.assembly.archive import GZIP, Compression, Output, write_root_layer
from nixery.assembly.manifest import image_config
from nixery.assembly.rootfs import NONROOT_USER, root_entries
from nixery.packages.names import parse_image_name
from nixery.packages.platforms import AMD64
from tests.clients import PODMAN_RUN_FLAGS, Containerd, ContainersTool, run, skopeo_inspect
from tests.conftest import Server, StartServer, require
from tests.http import call

UID = NONROOT_USER.uid
# Run inside the image: who am I, can I write where I should, and not where I should not.
PROBE = (
    'id -u; id -g; echo "$HOME"; '
    'echo home > "$HOME/probe" && cat "$HOME/probe"; '
    "echo tmp > /tmp/probe && cat /tmp/probe; "
    "if touch /probe 2>/dev/null; then echo root-writable; else echo root-refused; fi"
)
EXPECTED = [str(UID), str(NONROOT_USER.gid), NONROOT_USER.home, "home", "tmp", "root-refused"]


def runs_as_non_root(config: dict[str, Any]) -> bool:
    """What the kubelet accepts under `runAsNonRoot: true` without looking
    into the image: a `User` whose user part is a number other than 0 (a
    name cannot be verified and is refused)."""
    user = str(config.get("User") or "").split(":", 1)[0]
    return user.isdigit() and int(user) != 0


# -- unit tests -------------------------------------------------------------


def test_nonroot_is_a_meta_package_that_combines_with_others() -> None:
    plain = parse_image_name("shell/hello")
    request = parse_image_name("hello/nonroot/shell")
    assert request.nonroot and not plain.nonroot
    assert request.packages == plain.packages  # no package called nonroot
    assert request.variant() == ["nonroot"] and plain.variant() == []
    assert parse_image_name("nonroot/arm64/hello").platform is not None


def root_layer(tmp_path: Path, user: bool) -> tuple[bytes, dict[str, tarfile.TarInfo], bytes]:
    hello = tmp_path / "aaa-hello"
    (hello / "bin").mkdir(parents=True, exist_ok=True)
    (hello / "bin" / "hello").write_text("#!/bin/sh\n")
    entries = root_entries([("hello", str(hello))], NONROOT_USER if user else None)
    sink = io.BytesIO()
    write_root_layer(entries, [Output(Compression(GZIP, 1), sink)])
    blob = sink.getvalue()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as archive:
        members = {m.name: m for m in archive.getmembers()}
        passwd = archive.extractfile(members["etc/passwd"])
        assert passwd is not None
        return blob, members, passwd.read()


def test_root_layer_gives_the_user_a_home_and_nothing_else(tmp_path: Path) -> None:
    blob, members, passwd = root_layer(tmp_path, user=True)
    home = members["home/nonroot"]
    assert home.isdir() and (home.uid, home.gid, home.uname, home.gname) == (UID, UID, "", "")
    owned = sorted(name for name, m in members.items() if (m.uid, m.gid) != (0, 0))
    assert owned == ["home/nonroot"]
    assert members["tmp"].mode == 0o1777 and members["home"].mode == 0o755
    assert f"nonroot:x:{UID}:{UID}:nonroot:/home/nonroot:/bin/sh\n".encode() in passwd
    assert passwd.startswith(b"root:x:0:0:")
    # Reproducible: the same input gives the same bytes.
    assert root_layer(tmp_path, user=True)[0] == blob


def test_a_plain_root_layer_has_no_user(tmp_path: Path) -> None:
    blob, members, passwd = root_layer(tmp_path, user=False)
    assert b"nonroot" not in passwd and "home" not in members
    assert all((m.uid, m.gid) == (0, 0) for m in members.values())
    assert blob != root_layer(tmp_path, user=True)[0]


def test_owner_fields_are_what_tarfile_writes() -> None:
    """Numeric owners in the same bytes as tarfile's PAX format, names empty."""
    info = tarfile.TarInfo("home/nonroot/")
    info.type, info.mode, info.mtime, info.uid, info.gid = tarfile.DIRTYPE, 0o755, 1, UID, UID
    info.uname = info.gname = ""
    expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    ours = tar.header(b"home/nonroot", tar.DIRECTORY, 0o755, 1, uid=UID, gid=UID)
    assert ours == expected
    with pytest.raises(ValueError):
        tar.header(b"x", tar.DIRECTORY, 0o755, 1, uid=8**7)


def test_config_user_is_numeric_and_passes_run_as_non_root() -> None:
    config = image_config(AMD64, [], [], None, NONROOT_USER.config_user)["config"]
    assert config["User"] == f"{UID}:{UID}"
    assert runs_as_non_root(config)
    plain = image_config(AMD64, [], [], None)["config"]
    assert "User" not in plain and not runs_as_non_root(plain)
    assert not runs_as_non_root({"User": "nonroot"}) and not runs_as_non_root({"User": "0:0"})


# -- through a real server and real clients ---------------------------------

IMAGE = "nonroot/shell"


@pytest.fixture(scope="module")
def registry(start_module_server: StartServer) -> Server:
    return start_module_server()


@pytest.mark.e2e
def test_config_and_layers_through_skopeo(registry: Server, tmp_path: Path) -> None:
    require("skopeo")
    config = skopeo_inspect(registry.host, IMAGE, flags=(), raw=False)
    raw_config = json.loads(
        run(
            [
                "skopeo",
                "inspect",
                "--config",
                "--tls-verify=false",
                f"docker://{registry.host}/{IMAGE}",
            ]
        ).stdout  # fmt: skip
    )["config"]
    assert raw_config["User"] == f"{UID}:{UID}" and runs_as_non_root(raw_config)
    plain = json.loads(
        run(
            [
                "skopeo",
                "inspect",
                "--config",
                "--tls-verify=false",
                f"docker://{registry.host}/shell",
            ]
        ).stdout  # fmt: skip
    )["config"]
    assert not runs_as_non_root(plain)
    # Only the root layer differs from the plain image: package layers are shared.
    plain_layers = skopeo_inspect(registry.host, "shell")["Layers"]
    assert config["Layers"][:-1] == plain_layers[:-1]
    assert config["Layers"][-1] != plain_layers[-1]
    # Every entry of every layer belongs to root, but the user's home.
    dest = tmp_path / "dir"
    run(["skopeo", "copy", "--src-tls-verify=false",
         f"docker://{registry.host}/{IMAGE}", f"dir:{dest}"])  # fmt: skip
    owned = []
    for layer in json.loads((dest / "manifest.json").read_text())["layers"]:
        blob = dest / layer["digest"].removeprefix("sha256:")
        with tarfile.open(blob, "r:gz") as archive:
            owned += [(m.name, m.uid, m.gid) for m in archive if (m.uid, m.gid) != (0, 0)]
    assert owned == [("home/nonroot", UID, UID)]


@pytest.mark.e2e
def test_podman_runs_as_the_user(registry: Server) -> None:
    require("podman", "runc")
    podman = ContainersTool("podman")
    try:
        for image in (IMAGE, "nonroot/hello"):
            podman("pull", "--quiet", "--tls-verify=false", f"{registry.host}/{image}")
        ref = f"{registry.host}/{IMAGE}"
        out = podman("run", "--rm", "--pull=never", *PODMAN_RUN_FLAGS, ref, "bash", "-c", PROBE)
        assert out.split() == EXPECTED
        # A package without a shell runs as the user too.
        hello = f"{registry.host}/nonroot/hello"
        assert podman("run", "--rm", "--pull=never", *PODMAN_RUN_FLAGS, hello, "hello").strip() == (
            "Hello, world!"
        )
        user = json.loads(podman("image", "inspect", ref))[0]["Config"]["User"]
        assert user == f"{UID}:{UID}"
    finally:
        podman.close()


@pytest.mark.e2e
def test_containerd_runs_as_the_user(registry: Server, containerd: Containerd) -> None:
    ref = f"{registry.host}/{IMAGE}:latest"
    containerd("image", "pull", "--plain-http", ref)
    container = "nonroot-" + registry.host.rsplit(":", 1)[1]
    out = containerd.run_container(ref, container, "bash", "-c", PROBE)
    assert out.split() == EXPECTED
    containerd("image", "rm", ref)


@pytest.mark.e2e
def test_the_meta_package_page_says_who_the_image_runs_as(registry: Server) -> None:
    reply = call(registry.host, "GET", "/packages/nonroot")
    assert reply.status == 200
    assert f"uid and gid {UID}" in reply.body.decode()
