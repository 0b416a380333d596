"""The exception hierarchy and the registry error codes they map to.

Library code raises these; the HTTP layer renders `RegistryError`s in the
distribution spec's JSON format and the CLI turns `NixeryError`s into exit
codes. Nothing else decides statuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any


class ErrorCode(Enum):
    """Error codes of the OCI distribution spec, with their HTTP status.

    The first fourteen are the spec's; the rest are Docker distribution's,
    for the cases the spec names no code for. Statuses follow distribution.
    """

    BLOB_UNKNOWN = (404, "blob unknown to registry")
    BLOB_UPLOAD_INVALID = (400, "blob upload invalid")
    BLOB_UPLOAD_UNKNOWN = (404, "blob upload unknown to registry")
    DIGEST_INVALID = (400, "provided digest did not match uploaded content")
    MANIFEST_BLOB_UNKNOWN = (400, "manifest references a manifest or blob unknown to registry")
    MANIFEST_INVALID = (400, "manifest invalid")
    MANIFEST_UNKNOWN = (404, "manifest unknown to registry")
    NAME_INVALID = (400, "invalid repository name")
    NAME_UNKNOWN = (404, "repository name not known to registry")
    SIZE_INVALID = (400, "provided length did not match content length")
    UNAUTHORIZED = (401, "authentication required")
    DENIED = (403, "requested access to the resource is denied")
    UNSUPPORTED = (405, "the operation is unsupported")
    TOOMANYREQUESTS = (429, "too many requests")
    TAG_INVALID = (400, "manifest tag did not match URI")
    RANGE_INVALID = (416, "requested range not satisfiable")
    PAGINATION_NUMBER_INVALID = (400, "invalid number of results requested")
    UNKNOWN = (500, "unknown error")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def message(self) -> str:
        return self.value[1]


class NixeryError(Exception):
    """Base of every error Nixery raises on purpose."""


class RegistryError(NixeryError):
    """An error that has a place in the registry protocol."""

    def __init__(
        self,
        code: ErrorCode,
        detail: Any = None,
        message: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message or code.message)
        self.code = code
        self.detail = detail
        self.message = message or code.message
        self.headers = dict(headers or {})  # e.g. WWW-Authenticate, Retry-After

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": self.code.name, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}


class BuildNotAllowed(RegistryError):
    """The image is not cached and this request may not build it."""

    def __init__(self) -> None:
        super().__init__(
            ErrorCode.MANIFEST_UNKNOWN,
            {"reason": "not built yet, and this request may not start a build"},
            "image is not cached and this registry does not build it for this request",
        )


class ConfigError(NixeryError):
    """The configuration given to Nixery is inconsistent or unusable."""


class CommandError(NixeryError):
    """A subprocess exited unsuccessfully."""

    def __init__(self, argv: list[str], returncode: int, stderr: str):
        tail = "\n".join(stderr.strip().splitlines()[-20:])
        super().__init__(f"{argv[0]} exited with {returncode}: {tail}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class CommandTimeout(NixeryError):
    """A subprocess ran longer than allowed and was killed."""

    def __init__(self, argv: list[str], timeout: float, stderr: str):
        super().__init__(f"{argv[0]} timed out after {timeout:g}s")
        self.argv = argv
        self.timeout = timeout
        self.stderr = stderr


class UnknownPackages(NixeryError):
    """Some requested package names do not resolve in the package set, or
    name a package that refuses to evaluate (`refused`: name -> reason)."""

    def __init__(
        self,
        names: list[str],
        refused: Mapping[str, str] | None = None,
        overlays_applied: str | None = None,
    ):
        self.names = names
        self.refused = dict(refused or {})
        # How the package set got the configured overlays (see resolve.nix).
        self.overlays_applied = overlays_applied
        parts = ["unknown packages: " + ", ".join(names)] if names else []
        if self.refused:
            reasons = "; ".join(f"{name}: {why}" for name, why in sorted(self.refused.items()))
            parts.append("packages that do not evaluate: " + reasons)
        super().__init__("; ".join(parts))


class BuildFailed(NixeryError):
    """Nix failed to evaluate or build an image's packages."""

    def __init__(self, summary: str, log_tail: str):
        super().__init__(summary)
        self.summary = summary
        self.log_tail = log_tail


class SourceUnavailable(NixeryError):
    """The package source could not be reached or read (git, HTTP, flake lock)."""


class QueueFull(NixeryError):
    """Too many different computations are already running or waiting."""

    def __init__(self, running: int, waiting: int):
        super().__init__(f"{running} running and {waiting} waiting; no room for more")
        self.running = running
        self.waiting = waiting
