"""The image's root file system: the requested packages joined under `/`.

Like Nix's `buildEnv`, a top-level directory that only one package has
becomes a symlink to it; one that several packages have becomes a real
directory whose children are joined the same way. On a file conflict the
package that sorts first wins. Then the conventional files a container
expects are added: `/tmp`, root's home `/root`, `/usr/bin/env`,
`/etc/passwd`, `/etc/group`, `/etc/nsswitch.conf` and the CA bundle.

An image that runs as an unprivileged user (`nonroot`) also gets that
user's entries in `/etc/passwd` and `/etc/group` and a home directory it
owns. Its ids are fixed numbers, the same on every host, and only that home
is owned by them: everything else stays 0:0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/var/empty:/bin/false\n"
GROUP = b"root:x:0:\nnobody:x:65534:\n"
# Without this file, glibc before 2.35 (and resolvers that copy its documented
# default, `dns [!UNAVAIL=return] files`) asks DNS before /etc/hosts and stops
# at its answer, so even `localhost` would depend on the network.
NSSWITCH = b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
CA_BUNDLE = "etc/ssl/certs/ca-bundle.crt"
CA_ALIASES = ("etc/ssl/certs/ca-bundle.crt", "etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class ImageUser:
    """An unprivileged user an image runs as."""

    name: str
    uid: int
    gid: int
    home: str  # absolute

    @property
    def config_user(self) -> str:
        """The image config's `User`: numeric, so that a runtime checking
        "not root" (Kubernetes' runAsNonRoot) needs no /etc/passwd lookup."""
        return f"{self.uid}:{self.gid}"

    def passwd_line(self) -> bytes:
        return f"{self.name}:x:{self.uid}:{self.gid}:{self.name}:{self.home}:/bin/sh\n".encode()

    def group_line(self) -> bytes:
        return f"{self.name}:x:{self.gid}:\n".encode()


# The id distroless images use for the same purpose: above the ranges hosts
# give their own users (1000 and up), below nobody (65534), and within the
# 65536 ids a default user namespace maps.
NONROOT_USER = ImageUser("nonroot", 65532, 65532, "/home/nonroot")


@dataclass(frozen=True)
class RootEntry:
    path: str  # relative to `/`, no leading slash
    kind: str  # "dir", "symlink" or "file"
    mode: int = 0o755
    target: str = ""
    content: bytes = b""
    uid: int = 0
    gid: int = 0


class _Tree:
    """A mutable view of the root: relative path -> entry."""

    def __init__(self) -> None:
        self.entries: dict[str, RootEntry] = {}

    def join(self, rel: str, sources: Sequence[str]) -> None:
        names = sorted({n for src in sources for n in _listdir(src)})
        for name in names:
            path = f"{rel}/{name}" if rel else name
            providers = [
                os.path.join(s, name) for s in sources if os.path.lexists(os.path.join(s, name))
            ]
            dirs = [p for p in providers if os.path.isdir(p)]
            if len(providers) > 1 and len(dirs) == len(providers):
                self.entries[path] = RootEntry(path, "dir")
                self.join(path, dirs)
            else:
                self.entries[path] = RootEntry(path, "symlink", target=providers[0])

    def ensure_dir(self, path: str) -> None:
        """Make `path` a real directory, expanding symlinked parents."""
        parent = path.rpartition("/")[0]
        if parent:
            self.ensure_dir(parent)
        existing = self.entries.get(path)
        if existing and existing.kind == "dir":
            return
        self.entries[path] = RootEntry(path, "dir")
        if existing and existing.kind == "symlink" and os.path.isdir(existing.target):
            # Keep what the symlinked directory provided, one level down.
            for name in sorted(os.listdir(existing.target)):
                child = f"{path}/{name}"
                self.entries[child] = RootEntry(
                    child, "symlink", target=os.path.join(existing.target, name)
                )

    def put(self, entry: RootEntry) -> None:
        parent = entry.path.rpartition("/")[0]
        if parent:
            self.ensure_dir(parent)
        self.entries[entry.path] = entry


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path) if os.path.isdir(path) else []
    except OSError:
        return []


def root_entries(
    packages: Sequence[tuple[str, str]], user: ImageUser | None = None
) -> list[RootEntry]:
    """`packages` are (attribute name, store path) pairs, in any order; with
    `user`, the image is set up to run as that user."""
    tree = _Tree()
    ordered = sorted(packages)
    tree.join("", [out for _, out in ordered])
    outs = dict(ordered)

    tree.put(RootEntry("tmp", "dir", mode=0o1777))
    # Runtimes set HOME from /etc/passwd; programs write there (shell history, configs).
    tree.put(RootEntry("root", "dir", mode=0o700))
    coreutils = outs.get("coreutils")
    if coreutils and os.path.exists(os.path.join(coreutils, "bin", "env")):
        tree.put(RootEntry("usr/bin/env", "symlink", target=os.path.join(coreutils, "bin", "env")))
    tree.put(RootEntry("etc/passwd", "file", mode=0o644, content=PASSWD))
    tree.put(RootEntry("etc/group", "file", mode=0o644, content=GROUP))
    tree.put(RootEntry("etc/nsswitch.conf", "file", mode=0o644, content=NSSWITCH))
    cacert = outs.get("cacert")
    if cacert and os.path.exists(os.path.join(cacert, CA_BUNDLE)):
        for alias in CA_ALIASES:
            tree.put(RootEntry(alias, "symlink", target=os.path.join(cacert, CA_BUNDLE)))
    if user is not None:
        _add_user(tree, user)
    return list(tree.entries.values())


def _add_user(tree: _Tree, user: ImageUser) -> None:
    """The user's passwd and group lines after the others, and its home."""
    for path, line in (("etc/passwd", user.passwd_line()), ("etc/group", user.group_line())):
        entry = tree.entries[path]
        tree.put(RootEntry(path, "file", mode=entry.mode, content=entry.content + line))
    home = user.home.lstrip("/")
    tree.put(RootEntry(home, "dir", mode=0o755, uid=user.uid, gid=user.gid))
