"""Target platforms: the OCI names clients use and the Nix system behind them."""

from __future__ import annotations

import os
import platform as _host
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Platform:
    os: str
    architecture: str
    variant: str | None
    nix_system: str

    def __str__(self) -> str:
        tail = f"/{self.variant}" if self.variant else ""
        return f"{self.os}/{self.architecture}{tail}"

    def descriptor(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out


AMD64 = Platform("linux", "amd64", None, "x86_64-linux")
ARM64 = Platform("linux", "arm64", "v8", "aarch64-linux")
KNOWN = {str(p): p for p in (AMD64, ARM64)} | {"linux/arm64": ARM64}


def parse_platform(text: str) -> Platform:
    try:
        return KNOWN[text.strip()]
    except KeyError:
        raise ValueError(
            f"unsupported platform {text!r}; known: {', '.join(sorted(KNOWN))}"
        ) from None


def host_platform() -> Platform:
    machine = _host.machine().lower()
    return ARM64 if machine in ("aarch64", "arm64") else AMD64


def host_cores() -> int:
    """CPUs this process may run on (respects affinity and cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
