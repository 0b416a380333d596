"""Driving real registry clients from tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

TIMEOUT = 180


def run(argv: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def skopeo_copy(registry: str, image: str, dest: Path, tag: str = "latest") -> None:
    run(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            f"docker://{registry}/{image}",
            f"oci:{dest}:{tag}",
        ]
    )


def skopeo_inspect(registry: str, image: str, raw: bool = False) -> dict:
    argv = ["skopeo", "inspect", "--tls-verify=false"] + (["--raw"] if raw else [])
    return json.loads(run([*argv, f"docker://{registry}/{image}"]).stdout)


def umoci_unpack(layout: Path, bundle: Path, tag: str = "latest") -> Path:
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
    return bundle / "rootfs"


def bwrap_run(rootfs: Path, *command: str) -> str:
    """Run a command inside an unpacked image with nothing from the host."""
    argv = ["bwrap", "--bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp", "--unshare-all", "--die-with-parent", "--new-session",
            "--clearenv", "--setenv", "PATH", "/bin:/usr/bin", "--", *command]  # fmt: skip
    return run(argv).stdout
