"""Name lookups inside a pulled image follow /etc/hosts before DNS.

The image runs in a network namespace of its own whose only DNS server
answers every name with addresses of its own (tests/fakedns.py), with
/etc/hosts and /etc/resolv.conf bound in as container runtimes do. glibc
2.35 and later (the fixture's is 2.36) read /etc/hosts first even without
/etc/nsswitch.conf; older ones and resolvers that copy their default do not,
so the image must carry the file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.clients import skopeo_copy, umoci_unpack
from tests.conftest import Server, require

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
DNS_V4, DNS_V6 = "10.53.53.53", "fd53::53"


def getent_hosts(rootfs: Path, etc: Path, name: str) -> list[str]:
    """`getent hosts NAME` in the image, on a network whose DNS is tests/fakedns.py."""
    image = ["bwrap", "--bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev",
             "--ro-bind", str(etc / "hosts"), "/etc/hosts",
             "--ro-bind", str(etc / "resolv.conf"), "/etc/resolv.conf",
             "--unshare-pid", "--die-with-parent", "--clearenv", "--",
             "/bin/getent", "hosts", name]  # fmt: skip
    network = ["bwrap", "--bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
               "--unshare-net", "--die-with-parent", "--chdir", str(ROOT), "--",
               sys.executable, "-m", "tests.fakedns", DNS_V4, DNS_V6, "--", *image]  # fmt: skip
    result = subprocess.run(network, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_localhost_comes_from_etc_hosts_not_dns(server: Server, tmp_path: Path) -> None:
    require("skopeo", "umoci", "bwrap")
    skopeo_copy(server.host, "getent", tmp_path / "oci")
    rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
    assert "hosts: files dns" in (rootfs / "etc" / "nsswitch.conf").read_text()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")

    # DNS is reachable and answers names that /etc/hosts does not have ...
    assert getent_hosts(rootfs, etc, "registry.example")[0] in (DNS_V4, DNS_V6)
    # ... but localhost is answered from /etc/hosts.
    assert getent_hosts(rootfs, etc, "localhost")[0] in ("127.0.0.1", "::1")
