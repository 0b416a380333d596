"""From an image name to the packages and platform it asks for.

The grammars are those of the OCI distribution spec; everything that fails
them is rejected before any other work happens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nixery.errors import ErrorCode, RegistryError
from nixery.packages.platforms import ARM64, Platform

NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{NAME_COMPONENT}(?:/{NAME_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")

MAX_NAME_LENGTH = 255  # the spec's limit for registry host plus name; we apply it to the name
MAX_TAG_LENGTH = 128  # also enforced by TAG_RE
MAX_DIGEST_LENGTH = 256
MAX_GIT_REF_LENGTH = 255
DEFAULT_MAX_PACKAGES = 64

# What git itself accepts in a ref name (git check-ref-format), minus a
# leading '-', so a ref handed to git as an argument can never be an option.
_GIT_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")

SHELL_PACKAGES = ("bashInteractive", "coreutils", "moreutils", "nano")
# The meta-package that makes the image run as an unprivileged user (see `rootfs`).
NONROOT = "nonroot"
ALWAYS_INCLUDED = ("cacert", "iana-etc")


@dataclass(frozen=True)
class ImageRequest:
    """What an image name means: a sorted package list and maybe a platform."""

    packages: tuple[str, ...]
    platform: Platform | None  # None: the registry's configured platforms
    nonroot: bool = False  # run as the unprivileged user instead of root

    def variant(self) -> list[str]:
        """What, beyond the packages, decides the image (part of cache keys).
        Empty for a plain image, so its keys stay what they were."""
        return [NONROOT] if self.nonroot else []

    @property
    def requested(self) -> tuple[str, ...]:
        return tuple(p for p in self.packages if p not in ALWAYS_INCLUDED)


def validate_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise RegistryError(ErrorCode.NAME_INVALID, {"name": name[:MAX_NAME_LENGTH]})


def validate_tag(tag: str) -> None:
    if len(tag) > MAX_TAG_LENGTH or not TAG_RE.fullmatch(tag):
        raise RegistryError(ErrorCode.TAG_INVALID, {"tag": tag[:MAX_TAG_LENGTH]})


def validate_digest(digest: str) -> None:
    """Accept any digest the spec's grammar allows; only sha256 is stored."""
    if len(digest) > MAX_DIGEST_LENGTH or not DIGEST_RE.fullmatch(digest):
        raise RegistryError(ErrorCode.DIGEST_INVALID, {"digest": digest[:MAX_DIGEST_LENGTH]})
    if digest.startswith("sha256:") and not SHA256_RE.fullmatch(digest):
        raise RegistryError(ErrorCode.DIGEST_INVALID, {"digest": digest})


def is_safe_git_ref(ref: str) -> bool:
    """A branch, tag or commit name that git accepts and cannot take for an option."""
    return (
        0 < len(ref) <= MAX_GIT_REF_LENGTH
        and ref.isascii()
        and not ref.startswith(("-", "/"))
        and not ref.endswith(("/", ".", ".lock"))
        and ref != "@"
        and not _GIT_REF_FORBIDDEN.search(ref)
        and not any(part.startswith(".") or part.endswith(".lock") for part in ref.split("/"))
    )


def validate_git_ref(ref: str) -> str:
    """Return `ref` if it is safe to hand to git as a ref; else TAG_INVALID.

    Callers still pass refs after `--` or as `refs/...` where git allows it.
    """
    if not is_safe_git_ref(ref):
        raise RegistryError(
            ErrorCode.TAG_INVALID, {"ref": ref[:MAX_GIT_REF_LENGTH], "reason": "not a git ref"}
        )
    return ref


def is_digest(reference: str) -> bool:
    return ":" in reference


def is_sha256(digest: str) -> bool:
    return SHA256_RE.fullmatch(digest) is not None


def parse_image_name(name: str, max_packages: int = DEFAULT_MAX_PACKAGES) -> ImageRequest:
    """Turn `shell/git/curl` into the package attributes it names."""
    validate_name(name)
    components = name.split("/")
    if len(components) > max_packages:
        raise RegistryError(
            ErrorCode.NAME_INVALID,
            {"name": name, "reason": f"at most {max_packages} packages per image"},
        )
    packages: set[str] = set(ALWAYS_INCLUDED)
    platform: Platform | None = None
    nonroot = False
    for component in components:
        if component == "shell":
            packages.update(SHELL_PACKAGES)
        elif component == "arm64":
            platform = ARM64
        elif component == NONROOT:
            nonroot = True
        else:
            packages.add(attribute_name(component))
    return ImageRequest(tuple(sorted(packages)), platform, nonroot)


def attribute_name(component: str) -> str:
    """Nix attributes cannot start with a digit; nixpkgs prefixes an underscore."""
    parts = component.split(".")
    return ".".join(f"_{p}" if p[:1].isdigit() else p for p in parts)


def image_component(attr_path: str) -> str | None:
    """How to write an attribute in an image name (the inverse of
    `attribute_name`), or None if it cannot be written there."""
    parts = [p[1:] if p[:1] == "_" and p[1:2].isdigit() else p for p in attr_path.split(".")]
    component = ".".join(parts).lower()
    return component if re.fullmatch(NAME_COMPONENT, component) else None
