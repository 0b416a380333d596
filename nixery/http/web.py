"""The pages people read: what this registry is, how to pull from it, which
packages exist, what is being built, and what each built image holds.

Pages are Bottle templates from `nixery/templates` and need no JavaScript;
`static/app.js` only adds copy buttons. Like `app.py`, this module knows
nothing of Nix: it asks `ImageService` and reads `Activity`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bottle
from bottle import Bottle, HTTPResponse, request

from nixery.assembly.rootfs import NONROOT_USER
from nixery.errors import NixeryError
from nixery.images.activity import Activity, Build
from nixery.images.model import BuiltImage, Layer
from nixery.images.referrers import sbom_files
from nixery.images.service import ImageService
from nixery.packages.catalog import Lookup
from nixery.packages.graph import store_path_name
from nixery.packages.names import ALWAYS_INCLUDED, NONROOT, SHELL_PACKAGES, image_component
from nixery.packages.sources import LATEST
from nixery.storage import Storage
from nixery.units import human_seconds, human_size

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATE_LOOKUP = [str(HERE / "templates") + "/"]
STATIC_ROOT = str(HERE / "static")
EXAMPLE_IMAGE = "shell/git/curl"
QUERY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,99}")
HOST_RE = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
KEY_RE = re.compile(r"[a-f0-9]{64}")
FRONT_BUILDS = 8
FRONT_FAILURES = 5
REFRESH_SECONDS = 3
# Scripts, styles and images come from this server only; no inline code.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
META_PACKAGES = {
    "shell": "adds " + ", ".join(SHELL_PACKAGES) + "; the image runs bash by default",
    "arm64": "builds the image for linux/arm64 (aarch64-linux) instead of the host's platform",
    NONROOT: (
        f"runs the image as the unprivileged user {NONROOT_USER.name} "
        f"(uid and gid {NONROOT_USER.uid}), whose home is {NONROOT_USER.home}"
    ),
}


@dataclass(frozen=True)
class Row:
    """One layer in the layer chart."""

    number: int
    y: int
    width: float
    label: str
    title: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    rows: tuple[Row, ...]


def add_routes(app: Bottle, service: ImageService, storage: Storage, activity: Activity) -> None:
    """Mount the pages on `app`; call before any catch-all route."""

    def page(name: str, status: int = 200, **values: Any) -> HTTPResponse:
        context: dict[str, Any] = {
            "host": _registry_host(),
            "size": human_size,
            "ago": time_ago,
            "seconds": human_seconds,
            "iso": iso_time,
            "store_name": store_path_name,
            "refresh": None,
        }
        body = bottle.template(name, template_lookup=TEMPLATE_LOOKUP, **(context | values))
        return HTTPResponse(
            body,
            status=status,
            headers={
                "Content-Type": "text/html; charset=utf-8",
                "Content-Security-Policy": CSP,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "same-origin",
                "Cache-Control": "no-cache",
            },
        )

    def error_page(status: int, message: str) -> HTTPResponse:
        return page("error", status=status, title=f"{status}", message=message)

    @app.get("/", name="front")
    def front() -> HTTPResponse:
        query = request.query.getunicode("package")
        if query is not None:
            query = query.strip()
            if not QUERY_RE.fullmatch(query):
                return error_page(400, "A package name has letters, digits and . _ + - only.")
            return HTTPResponse(status=303, headers={"Location": f"/packages/{query}"})
        source, revision = _source(service)
        return page(
            "front",
            title="Nixery",
            example=EXAMPLE_IMAGE,
            insecure=_plain_http(),
            meta_packages=META_PACKAGES,
            always=ALWAYS_INCLUDED,
            source=source,
            revision=revision,
            running=activity.running(),
            builds=activity.builds()[:FRONT_BUILDS],
            failures=activity.failures()[:FRONT_FAILURES],
            refresh=REFRESH_SECONDS if activity.running() else None,
        )

    @app.get("/packages/<query>", name="package")
    def package(query: str) -> HTTPResponse:
        if not QUERY_RE.fullmatch(query):
            return error_page(400, "A package name has letters, digits and . _ + - only.")
        if query in META_PACKAGES:
            return page("meta", title=query, query=query, meaning=META_PACKAGES[query])
        try:
            found = service.lookup(query)
        except NixeryError as exc:
            log.warning("package lookup failed: %s", exc)
            return error_page(503, f"The package set could not be read: {exc}")
        return page(
            "package",
            title=query,
            lookup=found,
            suggestions=_suggestions(found),
            refusal_hint=refusal_hint(found.refused or ""),
            insecure=_plain_http(),
        )

    @app.get("/builds", name="builds")
    def builds() -> HTTPResponse:
        running = activity.running()
        return page(
            "builds",
            title="Builds",
            running=running,
            builds=activity.builds(),
            failures=activity.failures(),
            refresh=REFRESH_SECONDS if running else None,
        )

    @app.get("/builds.json", name="builds_json")
    def builds_json() -> HTTPResponse:
        body = {
            "running": [_running_json(b) for b in activity.running()],
            "builds": [r.to_json() for r in activity.builds()],
            "failures": [r.to_json() for r in activity.failures()],
        }
        return HTTPResponse(json.dumps(body), headers={"Content-Type": "application/json"})

    @app.get("/images/<key>", name="image")
    def image(key: str) -> HTTPResponse:
        raw = storage.get_document(f"images/{key}.json") if KEY_RE.fullmatch(key) else None
        if raw is None:
            return error_page(404, "No image was built under this key.")
        built = BuiltImage.from_json(json.loads(raw))
        records = [r for r in activity.builds() if r.key == key]
        sboms = {fmt: sbom_files(storage, index) for fmt, index in built.referrers.items()}
        return page(
            "image",
            title=records[0].image if records else "image",
            key=key,
            image=built,
            records=records,
            chart=layer_chart(built.layers),
            bar_y=BAR_Y,
            bar_height=BAR_HEIGHT,
            total=sum(layer.size for layer in built.layers),
            sboms=sboms,
        )

    @app.get("/images/<key>/sbom/<digest>", name="image_sbom")
    def image_sbom(key: str, digest: str) -> HTTPResponse:
        """One of the image's bills of materials, typed so browsers show it."""
        raw = storage.get_document(f"images/{key}.json") if KEY_RE.fullmatch(key) else None
        if raw is None:
            return error_page(404, "No image was built under this key.")
        built = BuiltImage.from_json(json.loads(raw))
        files = [f for index in built.referrers.values() for f in sbom_files(storage, index)]
        blob = next((b for _, b in files if b.digest == digest), None)
        data = storage.read_blob(digest) if blob is not None else None
        if blob is None or data is None:
            return error_page(404, "This image has no such bill of materials.")
        return HTTPResponse(
            data,
            headers={
                "Content-Type": blob.media_type,
                "Docker-Content-Digest": digest,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "public, max-age=86400, immutable",
            },
        )

    @app.get("/static/<filename>", name="static")
    def static(filename: str) -> HTTPResponse:
        response = bottle.static_file(filename, root=STATIC_ROOT)
        response.set_header("Cache-Control", "public, max-age=300")
        return response


def _source(service: ImageService) -> tuple[str, str]:
    source = service.sources.config.describe()
    try:
        return source, service.sources.resolve(LATEST).revision
    except NixeryError as exc:
        return source, f"unavailable ({exc})"


def refusal_hint(reason: str) -> str:
    """What the operator can change about a package that refuses to evaluate."""
    text = reason.lower()
    if "unfree" in text:
        change = "allow unfree packages (`config.allowUnfree = true;`)"
    elif "insecure" in text:
        change = "permit it (`config.permittedInsecurePackages`)"
    elif "broken" in text or "not supported" in text:
        change = (
            "allow it (`config.allowBroken = true;` or `config.allowUnsupportedSystem = true;`)"
        )
    else:
        return (
            "A removed package or alias cannot be allowed: the message names what "
            "replaces it, or the operator can add it back in an overlay."
        )
    return (
        f"The operator can {change} in the package set itself, e.g. a file "
        "`{ system, overlays, ... }: import ./nixpkgs { inherit system overlays; config = ...; }`; "
        "the server does not read ~/.config/nixpkgs, NIXPKGS_CONFIG or NIXPKGS_ALLOW_*."
    )


def _suggestions(found: Lookup) -> list[tuple[str, str | None]]:
    """(attribute, image name) pairs for "did you mean"."""
    return [(attr, image_component(attr)) for attr in found.suggestions]


def _running_json(build: Build) -> dict[str, Any]:
    return {
        "id": build.id,
        "image": build.image,
        "tag": build.tag,
        "platform": build.platform,
        "phase": build.phase,
        "done": build.done,
        "total": build.total,
        "started_at": build.started_at,
        "elapsed": build.elapsed(),
        "log": build.lines()[-10:],
    }


def _registry_host() -> str:
    """This registry's name as clients reach it (Host or X-Forwarded-Host)."""
    host = request.urlparts.netloc
    return host if HOST_RE.fullmatch(host) else "HOST"


def _plain_http() -> bool:
    """Clients must be told to allow plain HTTP, except for local names."""
    hostname = request.urlparts.hostname or ""
    local = hostname in ("localhost", "::1") or hostname.startswith("127.")
    return request.urlparts.scheme == "http" and not local


# -- formatting used by the templates -------------------------------------


def time_ago(epoch: float, now: float | None = None) -> str:
    delta = max((now or time.time()) - epoch, 0)
    if delta < 60:
        return "just now"
    for unit, length in (("day", 86400), ("hour", 3600), ("min", 60)):
        if delta >= length:
            count = int(delta // length)
            plural = "s" if count > 1 and unit != "min" else ""
            return f"{count} {unit}{plural} ago"
    raise AssertionError("unreachable")


def iso_time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- the layer chart --------------------------------------------------------

CHART_WIDTH = 640
ROW_HEIGHT = 44
BAR_HEIGHT = 14
BAR_Y = 22  # below the label
LABEL_CHARS = 70


def layer_chart(layers: Sequence[Layer]) -> Chart:
    """One row per layer: its label, then a bar as long as its share of the
    biggest layer (at least a sliver, so tiny layers stay visible)."""
    biggest = max((layer.size for layer in layers), default=1) or 1
    rows = []
    for number, layer in enumerate(layers, 1):
        names = [store_path_name(p) for p in layer.paths] or ["root file system: /etc, /bin, …"]
        label = f"{number}. {human_size(layer.size)} · {', '.join(names)}"
        if len(label) > LABEL_CHARS:
            label = label[: LABEL_CHARS - 1] + "…"
        width = max(CHART_WIDTH * layer.size / biggest, 2.0)
        rows.append(
            Row(number, (number - 1) * ROW_HEIGHT, round(width, 1), label, "\n".join(names))
        )
    return Chart(CHART_WIDTH, max(len(rows), 1) * ROW_HEIGHT, tuple(rows))
