"""The registry's HTTP interface: a Bottle app built by `create_app`.

Routes validate input and call one `ImageService` or `Storage` method; all
error rendering happens in `_registry_errors`, in the spec's JSON format.
This module knows nothing of Nix.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import bottle
from bottle import Bottle, HTTPResponse, Route, request

from nixery.assembly.manifest import Document, negotiate
from nixery.errors import BuildFailed, ErrorCode, NixeryError, RegistryError
from nixery.http import web
from nixery.http.auth import MAY_BUILD
from nixery.http.headers import header
from nixery.images.activity import Activity
from nixery.images.service import ImageService
from nixery.ops import logs
from nixery.ops.health import Health, storage_writable
from nixery.ops.metrics import Metrics
from nixery.packages.names import is_sha256, validate_digest, validate_name, validate_tag
from nixery.storage import BlobLocation, Storage

log = logging.getLogger(__name__)
access_log = logging.getLogger("nixery.access")

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
REQUEST_ID = "X-Request-Id"
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
SERVED_KINDS = {"blob": "blob", "manifest": "manifest"}  # route name -> bytes-served kind
QUIET_ROUTES = frozenset({"metrics", "healthz", "livez", "static"})  # probes: logged at debug level
# Bottle's `path` filter stops at a line break: such requests would get its
# HTML 404, unlogged and uncounted.
ANY_PATH = "/<path:re:[\\s\\S]+>"


def error_response(exc: RegistryError, headers: dict[str, str] | None = None) -> HTTPResponse:
    body = json.dumps(exc.to_json())
    response = HTTPResponse(body, status=exc.code.status, headers=headers)
    response.set_header("Content-Type", "application/json; charset=utf-8")
    return response


def _registry_errors(callback: Callable[..., Any]) -> Callable[..., Any]:
    """Bottle plugin: render errors in one place and tag every response."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = callback(*args, **kwargs)
        except RegistryError as exc:
            result = error_response(exc, exc.headers)
        except BuildFailed as exc:
            result = error_response(
                RegistryError(
                    ErrorCode.UNKNOWN, {"log": exc.log_tail}, f"image build failed: {exc.summary}"
                )
            )
        except HTTPResponse as exc:
            result = exc
        except NixeryError as exc:
            log.exception("request failed")
            result = error_response(RegistryError(ErrorCode.UNKNOWN, message=str(exc)))
        except Exception:
            log.exception("unexpected error")
            result = error_response(RegistryError(ErrorCode.UNKNOWN))
        target = result if isinstance(result, HTTPResponse) else bottle.response
        target.set_header(*API_VERSION)
        return result

    return wrapper


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Whether an If-None-Match value names `etag` (weak comparison, RFC 9110)."""
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def _manifest_response(document: Document) -> HTTPResponse:
    etag = f'"{document.digest}"'
    headers = {
        "Content-Type": document.media_type,
        "Docker-Content-Digest": document.digest,
        "ETag": etag,
        "Content-Length": str(len(document.data)),
        # A tag names an index, a manifest or another dialect by Accept:
        # caches in front of the registry must key on it.
        "Vary": "Accept",
    }
    if etag_matches(header(request.environ, "If-None-Match", ""), etag):
        return HTTPResponse(status=304, headers=headers)
    return HTTPResponse(document.data, status=200, headers=headers)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one `[start, end)` range a Range header asks for; None means the whole blob.

    Other units and multi-range requests are ignored (RFC 9110 allows that);
    a bytes range that fits nowhere is `RANGE_INVALID`.
    """
    if not header or not header.strip().startswith("bytes="):
        return None
    ranges = list(bottle.parse_range_header(header.strip(), size))
    if not ranges:
        raise RegistryError(ErrorCode.RANGE_INVALID, {"size": size}, "range not satisfiable")
    return ranges[0] if len(ranges) == 1 else None


def _chunks(fh: BinaryIO, start: int, end: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    with fh:
        if start:
            fh.seek(start)
        remaining = end - start
        while remaining > 0:
            data = fh.read(min(chunk, remaining))
            if not data:
                return
            remaining -= len(data)
            yield data


def _blob_response(digest: str, location: BlobLocation, storage: Storage) -> HTTPResponse:
    headers = {"Docker-Content-Digest": digest}
    if location.url is not None:
        return HTTPResponse(status=307, headers={**headers, "Location": location.url})
    etag = f'"{digest}"'
    headers |= {"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    if etag_matches(header(request.environ, "If-None-Match", ""), etag):
        return HTTPResponse(status=304, headers=headers)
    size = location.size
    wanted = header(request.environ, "Range")
    if_range = header(request.environ, "If-Range")
    if if_range and if_range.strip() != etag:
        wanted = ""  # a validator of some other content (or a date): the whole blob
    try:
        span = byte_range(wanted, size)
    except RegistryError as exc:
        response = error_response(exc)
        response.set_header("Content-Range", f"bytes */{size}")
        return response
    start, end = span or (0, size)
    headers["Content-Length"] = str(end - start)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if request.method == "HEAD":
        return HTTPResponse(status=status, headers=headers)
    if location.path is None:
        # Relayed from the backend, which we ask with our own credentials.
        relayed = storage.open_blob_range(digest, start, end)
        if relayed is None:
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": digest})
        return HTTPResponse(_chunks(relayed, 0, end - start), status=status, headers=headers)
    try:
        fh = open(location.path, "rb")  # closed by the server once sent
    except FileNotFoundError:
        raise RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": digest}) from None
    if "wsgi.file_wrapper" in request.environ:
        # The server sends Content-Length bytes from here, with sendfile(2)
        # where it can: no per-chunk work in Python.
        fh.seek(start)
        return HTTPResponse(fh, status=status, headers=headers)
    return HTTPResponse(_chunks(fh, start, end), status=status, headers=headers)


def tag_page(tags: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """The tags after `last`, at most `n` of them, and whether more follow."""
    rest = [t for t in sorted(tags) if last is None or t > last]
    if n is None:
        return rest, False
    return rest[:n], 0 < n < len(rest)


def _page_size(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 9:
        raise RegistryError(ErrorCode.PAGINATION_NUMBER_INVALID, {"n": value[:20]})
    return int(value)


class _Observer:
    """Bottle plugin, outermost: request id header, metrics, one log line."""

    name = "nixery_observer"
    api = 2

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def apply(self, callback: Callable[..., Any], route: Route) -> Callable[..., Any]:
        label = route.name or route.rule

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            result: Any = None
            try:
                result = callback(*args, **kwargs)
                return result
            finally:
                target = result if isinstance(result, HTTPResponse) else bottle.response
                target.set_header(REQUEST_ID, request.environ.get("nixery.request_id", ""))
                self._record(label, target, time.monotonic() - started)

        return wrapper

    def _record(self, label: str, response: bottle.BaseResponse, seconds: float) -> None:
        status = response.status_code
        size = _body_size(response)
        self.metrics.request(label, request.method, status, seconds)
        kind = SERVED_KINDS.get(label)
        if kind and request.method == "GET" and status in (200, 206):
            self.metrics.bytes_served(kind, size)
        access_log.log(
            logging.DEBUG if label in QUIET_ROUTES else logging.INFO,
            "%s %s %d",
            request.method, request.path, status,
            extra={"method": request.method, "path": request.path, "route": label,
                   "status": status, "bytes": size, "duration": round(seconds, 4)},
        )  # fmt: skip


def _body_size(response: bottle.BaseResponse) -> int:
    """Content-Length, else the size of a body held in memory (streams count 0)."""
    length = response.get_header("Content-Length")
    if length is not None and length.isdigit():
        return int(length)
    body = getattr(response, "body", b"")
    if isinstance(body, str):
        return len(body.encode())
    return len(body) if isinstance(body, bytes) else 0


def _begin_request() -> None:
    """Bottle hook: give the request an id (the client's, if it sent a sane one)."""
    # Raw from the environ: Bottle's header view fails on bytes that are not UTF-8.
    given = request.environ.get("HTTP_X_REQUEST_ID", "")
    request_id = given if REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
    request.environ["nixery.request_id"] = request_id
    logs.begin(request_id=request_id)


def create_app(
    service: ImageService,
    storage: Storage,
    *,
    activity: Activity | None = None,
    metrics: Metrics | None = None,
    health: Health | None = None,
    plugins: Sequence[Any] = (),
) -> Bottle:
    """`plugins` (rate limits, access control) wrap every route inside error rendering."""
    metrics = metrics or Metrics()
    health = health or Health({"storage": storage_writable(storage)})
    app = Bottle()
    app.config["json.enable"] = False
    app.install(_Observer(metrics))
    app.install(_registry_errors)
    for plugin in plugins:
        app.install(plugin)
    app.add_hook("before_request", _begin_request)

    @app.get("/metrics", name="metrics")
    def metrics_page() -> HTTPResponse:
        body, content_type = metrics.render(header(request.environ, "Accept", ""))
        return HTTPResponse(body, headers={"Content-Type": content_type})

    # Public even with --auth: probes carry no credentials.
    @app.get("/healthz", name="healthz", public=True)
    def healthz() -> HTTPResponse:
        healthy, body = health.report()
        return HTTPResponse(
            json.dumps(body),
            status=200 if healthy else 503,
            headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
        )

    # Liveness: the process answers, nothing more. Restarting replicas
    # because storage or Nix is down (what /healthz reports) would only
    # abandon their builds.
    @app.get("/livez", name="livez", public=True)
    def livez() -> HTTPResponse:
        return HTTPResponse(
            '{"status": "ok"}',
            headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
        )

    web.add_routes(app, service, storage, activity or Activity())

    @app.get("/v2", name="base")
    @app.get("/v2/", name="base")
    def base() -> HTTPResponse:
        return HTTPResponse("{}", headers={"Content-Type": "application/json"})

    @app.get("/v2/<name:path>/manifests/<reference>", name="manifest")
    def manifest(name: str, reference: str) -> HTTPResponse:
        logs.bind(image=name[:255], tag=reference[:128])
        accept = negotiate([header(request.environ, "Accept", "")])
        may_build = request.environ.get(MAY_BUILD, True)
        return _manifest_response(service.manifest(name, reference, accept, may_build=may_build))

    @app.get("/v2/<name:path>/blobs/uploads/", name="upload")
    @app.get("/v2/<name:path>/blobs/uploads/<upload>", name="upload")
    def upload(name: str, upload: str = "") -> HTTPResponse:
        raise RegistryError(ErrorCode.BLOB_UPLOAD_UNKNOWN, message="this registry is pull-only")

    @app.get("/v2/<name:path>/blobs/<digest>", name="blob")
    def blob(name: str, digest: str) -> HTTPResponse:
        validate_name(name)
        validate_digest(digest)
        location = storage.locate_blob(digest) if is_sha256(digest) else None
        if location is None:
            service.blob_missing(digest)  # manifests kept in memory may reference it
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": digest})
        return _blob_response(digest, location, storage)

    @app.get("/v2/<name:path>/tags/list", name="tags")
    def tags(name: str) -> HTTPResponse:
        n = _page_size(request.query.get("n"))
        last = request.query.get("last") or None  # `last=` is the first page, as in distribution
        if last is not None:
            validate_tag(last)
        page, more = tag_page(service.tags(name), n, last)
        headers = {"Content-Type": "application/json"}
        if more:
            headers["Link"] = f'</v2/{name}/tags/list?n={n}&last={page[-1]}>; rel="next"'
        return HTTPResponse(json.dumps({"name": name, "tags": page}), headers=headers)

    @app.get("/v2/<name:path>/referrers/<digest>", name="referrers")
    def referrers(name: str, digest: str) -> HTTPResponse:
        validate_name(name)
        validate_digest(digest)
        artifact_type = request.query.getunicode("artifactType") or None
        index = service.referrers(name, digest, artifact_type)
        headers = {"Content-Type": index.media_type}
        if artifact_type:
            headers["OCI-Filters-Applied"] = "artifactType"
        return HTTPResponse(index.data, headers=headers)

    # Any method a route does not take (PUT, OPTIONS, ...): Bottle would answer in HTML.
    @app.route("/", method="ANY", name="unsupported")
    @app.route(ANY_PATH, method="ANY", name="unsupported")
    def unsupported(path: str = "") -> HTTPResponse:
        raise RegistryError(
            ErrorCode.UNSUPPORTED,
            {"method": request.method[:20]},
            "this registry is pull-only",
            headers={"Allow": "GET, HEAD"},
        )

    @app.get(ANY_PATH, name="not_found")
    def not_found(path: str) -> HTTPResponse:
        raise RegistryError(ErrorCode.NAME_UNKNOWN, {"path": "/" + path[:200]}, "no such endpoint")

    return app
