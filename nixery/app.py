"""The registry's HTTP interface: a Bottle app built by `create_app`.

Routes validate input and call one `ImageService` or `Storage` method; all
error rendering happens in `_registry_errors`, in the spec's JSON format.
This module knows nothing of Nix.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import bottle
from bottle import Bottle, HTTPResponse, request

from nixery.errors import BuildFailed, ErrorCode, NixeryError, RegistryError
from nixery.images import ImageService
from nixery.manifest import Document, negotiate
from nixery.names import validate_digest, validate_name
from nixery.storage import Storage

log = logging.getLogger(__name__)

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
WRITE_METHODS = ["POST", "PUT", "PATCH", "DELETE"]


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
            result = error_response(exc)
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


def _manifest_response(document: Document) -> HTTPResponse:
    etag = f'"{document.digest}"'
    headers = {
        "Content-Type": document.media_type,
        "Docker-Content-Digest": document.digest,
        "ETag": etag,
        "Content-Length": str(len(document.data)),
    }
    if_none_match = request.get_header("If-None-Match", "")
    if etag in [t.strip() for t in if_none_match.split(",")]:
        return HTTPResponse(
            status=304, headers={k: v for k, v in headers.items() if k != "Content-Length"}
        )
    return HTTPResponse(document.data, status=200, headers=headers)


def create_app(service: ImageService, storage: Storage) -> Bottle:
    app = Bottle(autojson=False)
    app.install(_registry_errors)

    @app.get("/v2/")
    def base() -> HTTPResponse:
        return HTTPResponse("{}", headers={"Content-Type": "application/json"})

    @app.get("/v2/<name:path>/manifests/<reference>")
    def manifest(name: str, reference: str) -> HTTPResponse:
        accept = negotiate([request.get_header("Accept", "")])
        return _manifest_response(service.manifest(name, reference, accept))

    @app.get("/v2/<name:path>/blobs/<digest>")
    def blob(name: str, digest: str) -> HTTPResponse:
        validate_name(name)
        validate_digest(digest)
        location = storage.locate_blob(digest) if digest.startswith("sha256:") else None
        if location is None:
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": digest})
        if location.url is not None:
            return HTTPResponse(
                status=307, headers={"Location": location.url, "Docker-Content-Digest": digest}
            )
        assert location.path is not None
        response = bottle.static_file(
            os.path.basename(location.path),
            root=os.path.dirname(location.path),
            mimetype="application/octet-stream",
        )
        if response.status_code == 416:
            raise RegistryError(
                ErrorCode.RANGE_INVALID, {"size": location.size}, "range not satisfiable"
            )
        response.set_header("Docker-Content-Digest", digest)
        response.set_header("ETag", f'"{digest}"')
        return response

    @app.get("/v2/<name:path>/tags/list")
    def tags(name: str) -> HTTPResponse:
        validate_name(name)
        body = json.dumps({"name": name, "tags": ["latest"]})
        return HTTPResponse(body, headers={"Content-Type": "application/json"})

    @app.route("/v2/<path:path>", method=WRITE_METHODS)
    def unsupported(path: str) -> HTTPResponse:
        raise RegistryError(
            ErrorCode.UNSUPPORTED, {"method": request.method}, "this registry is pull-only"
        )

    @app.route("/<path:path>", method=["GET", *WRITE_METHODS])
    def not_found(path: str) -> HTTPResponse:
        raise RegistryError(ErrorCode.NAME_UNKNOWN, {"path": "/" + path[:200]}, "no such endpoint")

    return app
