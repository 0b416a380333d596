"""Access control: who may pull, and who may make the registry build.

Off by default. `AccessControl` is a Bottle plugin: once installed it wraps
every route of the app (including routes added later, such as the front
page), except routes declared with `public=True`. Two ways to authenticate:

- `htpasswd:FILE`: HTTP Basic against bcrypt entries (as distribution's
  htpasswd); challenges with `WWW-Authenticate: Basic`.
- `token:FILE`: the Docker token flow. Registry routes challenge with
  `WWW-Authenticate: Bearer realm=...,service=...,scope=...`; clients fetch a
  short-lived HMAC-signed JWT from `/token` (Basic credentials from FILE, or
  anonymously when anonymous pulls are allowed) scoped to
  `repository:<name>:pull`, and a token only opens the repositories it names.

`read_only_cache` lets anonymous clients pull what is already built and
stops builds for them; without an authenticator it stops builds for all.
Anonymous clients never reach anything but the pull routes, and server
errors they see carry no detail (build logs, package names, paths).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bcrypt
import jwt
from bottle import HTTPResponse, Request, request

from nixery.errors import BuildNotAllowed, ConfigError, ErrorCode, NixeryError, RegistryError
from nixery.http.headers import header as request_header
from nixery.packages.names import NAME_RE

log = logging.getLogger(__name__)

# Set on the WSGI environ for the routes: False when this request must not build.
MAY_BUILD = "nixery.may_build"
IDENTITY = "nixery.identity"

REALM = "nixery"
SERVICE = "nixery"
TOKEN_TTL = 300
TOKEN_ISSUER = "nixery"
TOKEN_PATH = "/token"
PULL_METHODS = ("GET", "HEAD")
VERIFIED_TTL = 300  # seconds a checked password is remembered (bcrypt is slow by design)
MAX_SCOPES = 16
HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


@dataclass(frozen=True)
class Identity:
    """Who is asking. `repositories` is None when any repository may be pulled."""

    user: str | None  # None: anonymous
    repositories: frozenset[str] | None = None
    token: bool = False  # holds a valid token (maybe an anonymous one)

    @property
    def anonymous(self) -> bool:
        return not self.user

    def may_pull(self, name: str) -> bool:
        return self.repositories is None or name in self.repositories


ANONYMOUS = Identity(None)


class InvalidCredentials(Exception):
    """Credentials were sent and are wrong: refuse, never fall back to anonymous."""


# -- htpasswd ---------------------------------------------------------------


def _is_bcrypt(hashed: str) -> bool:
    return hashed.startswith(("$2a$", "$2b$", "$2y$")) and len(hashed) == 60


def parse_htpasswd(text: str, source: str) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"{source}:{number}: expected USER:BCRYPT-HASH")
        if not _is_bcrypt(hashed):
            raise ConfigError(f"{source}:{number}: only bcrypt entries are supported (htpasswd -B)")
        users[user] = hashed.encode()
    return users


class Htpasswd:
    """bcrypt entries from a file, re-read when the file changes."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, bytes] = {}
        self._checked = 0.0
        self._verified: dict[tuple[str, bytes, bytes], float] = {}
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(4))
        self._load(strict=True)

    def _load(self, strict: bool) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            users = parse_htpasswd(self.path.read_text(), str(self.path))
        except (OSError, ConfigError, UnicodeDecodeError) as exc:
            if strict:
                raise ConfigError(f"cannot use htpasswd file {self.path}: {exc}") from exc
            log.error("keeping the previous users: cannot reload %s: %s", self.path, exc)
            return
        self._users, self._stamp = users, stamp
        self._verified.clear()

    def check(self, user: str, password: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._checked > 1:
                self._checked = now
                self._load(strict=False)
            hashed = self._users.get(user)
        secret = password.encode()
        # Remember successes by a digest of the password, never the password.
        key = (user, hashed or b"", hashlib.sha256(secret).digest())
        with self._lock:
            if self._verified.get(key, 0) > now:
                return True
        # Unknown users cost a bcrypt check too, so timing does not reveal them.
        ok = bcrypt.checkpw(secret, hashed or self._dummy) and hashed is not None
        if ok:
            with self._lock:
                if len(self._verified) > 10_000:
                    self._verified.clear()
                self._verified[key] = now + VERIFIED_TTL
        return ok


def basic_credentials(req: Request) -> tuple[str, str] | None:
    """The user and password of a Basic `Authorization` header, or None."""
    header = request_header(req.environ, "Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:  # binascii.Error, non-ASCII input
        raise InvalidCredentials("malformed basic credentials") from exc
    user, sep, password = decoded.partition(":")
    if not sep:
        raise InvalidCredentials("malformed basic credentials")
    return user, password


# -- authenticators -----------------------------------------------------------


class Authenticator:
    """Turns a request's credentials into an Identity and says how to ask for them."""

    def identify(self, req: Request) -> Identity:
        raise NotImplementedError

    def challenge(self, req: Request, scope: str | None, error: str | None = None) -> str:
        raise NotImplementedError

    def routes(self) -> Iterable[tuple[str, list[str], Callable[..., Any]]]:
        return ()


class BasicAuth(Authenticator):
    def __init__(self, users: Htpasswd, realm: str = REALM):
        self.users = users
        self.realm = realm

    def identify(self, req: Request) -> Identity:
        creds = basic_credentials(req)
        if creds is None:
            if request_header(req.environ, "Authorization"):
                raise InvalidCredentials("unsupported authorization scheme")
            return ANONYMOUS
        if not self.users.check(*creds):
            raise InvalidCredentials("wrong user or password")
        return Identity(creds[0])

    def challenge(self, req: Request, scope: str | None, error: str | None = None) -> str:
        return f'Basic realm="{self.realm}", charset="UTF-8"'


def load_token_key(path: str | None) -> bytes:
    """The HMAC key signing tokens: from a file (created if missing) or random per process."""
    if not path:
        return secrets.token_bytes(32)
    key_file = Path(path)
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    try:
        key = key_file.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token key {path}: {exc}") from exc
    if len(key) < 32:
        raise ConfigError(f"token key {path} must hold at least 32 bytes")
    return key


def parse_scopes(values: Iterable[str]) -> frozenset[str]:
    """Repository names granted `pull` by `repository:<name>:<actions>` scopes.

    Other resource types and actions are ignored: this registry only pulls.
    """
    granted: set[str] = set()
    scopes = [s for value in values for s in value.split()]
    for scope in scopes[:MAX_SCOPES]:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind == "repository" and NAME_RE.fullmatch(name) and "pull" in actions.split(","):
            granted.add(name)
    return frozenset(granted)


class TokenAuth(Authenticator):
    """The Docker token flow, with this registry as its own token server."""

    def __init__(
        self,
        users: Htpasswd,
        key: bytes,
        anonymous_tokens: bool,
        realm_url: str | None = None,
        ttl: int = TOKEN_TTL,
    ):
        self.users = users
        self.basic = BasicAuth(users)
        self.key = key
        self.anonymous_tokens = anonymous_tokens
        self.realm_url = realm_url
        self.ttl = ttl

    def realm(self, req: Request) -> str:
        if self.realm_url:
            return self.realm_url
        # Host and scheme of this connection; not X-Forwarded-*, which any
        # client can send (behind a proxy, set --token-realm).
        scheme = req.environ.get("wsgi.url_scheme", "http")
        host = req.environ.get("HTTP_HOST", "")
        if not HOST_RE.fullmatch(host):
            host = f"{req.environ.get('SERVER_NAME', 'localhost')}:{req.environ.get('SERVER_PORT')}"
        return f"{scheme}://{host}{TOKEN_PATH}"

    def identify(self, req: Request) -> Identity:
        header = request_header(req.environ, "Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            # Browsers (the front page) and plain clients may use Basic directly.
            return self.basic.identify(req)
        try:
            claims = jwt.decode(
                value.strip(),
                self.key,
                algorithms=["HS256"],
                audience=SERVICE,
                issuer=TOKEN_ISSUER,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidCredentials(f"invalid token: {exc}") from exc
        names = {
            entry.get("name")
            for entry in claims.get("access") or []
            if isinstance(entry, dict)
            and entry.get("type") == "repository"
            and "pull" in (entry.get("actions") or [])
        }
        return Identity(str(claims["sub"]) or None, frozenset(n for n in names if n), token=True)

    def challenge(self, req: Request, scope: str | None, error: str | None = None) -> str:
        if not req.path.startswith("/v2/"):
            return self.basic.challenge(req, scope, error)
        parts = [f'realm="{self.realm(req)}"', f'service="{SERVICE}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return "Bearer " + ",".join(parts)

    def routes(self) -> Iterable[tuple[str, list[str], Callable[..., Any]]]:
        return [(TOKEN_PATH, ["GET", "POST"], self.token_endpoint)]

    def token_endpoint(self) -> HTTPResponse:
        """GET with Basic credentials (or none), or POST as an OAuth2 password grant."""
        if request.method == "POST":
            form = request.forms
            if form.get("grant_type") != "password":
                return _oauth_error("unsupported_grant_type")
            user: str | None = form.getunicode("username") or ""
            ok = self.users.check(user or "", form.getunicode("password") or "")
            if not ok:
                return _oauth_error("invalid_grant", 401)
            scopes = [form.getunicode("scope") or ""]
        else:
            try:
                creds = basic_credentials(request)
            except InvalidCredentials:
                creds = ("", "")
            if creds is None and not self.anonymous_tokens:
                raise self._refuse("anonymous access is not allowed")
            if creds is not None and not self.users.check(*creds):
                raise self._refuse("wrong user or password")
            user = creds[0] if creds else None
            scopes = request.query.getall("scope")
        return self._issue(user, parse_scopes(scopes))

    def _refuse(self, message: str) -> RegistryError:
        return RegistryError(
            ErrorCode.UNAUTHORIZED,
            message=message,
            headers={"WWW-Authenticate": self.basic.challenge(request, None)},
        )

    def _issue(self, user: str | None, repositories: frozenset[str]) -> HTTPResponse:
        now = int(time.time())
        claims = {
            "iss": TOKEN_ISSUER,
            "aud": SERVICE,
            "sub": user or "",
            "iat": now,
            "nbf": now - 1,
            "exp": now + self.ttl,
            "jti": uuid.uuid4().hex,
            "access": [
                {"type": "repository", "name": name, "actions": ["pull"]}
                for name in sorted(repositories)
            ],
        }
        token = jwt.encode(claims, self.key, algorithm="HS256")
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.ttl,
            "issued_at": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
        }
        return _json(body, 200)


def _json(body: dict[str, Any], status: int) -> HTTPResponse:
    return HTTPResponse(
        json.dumps(body), status=status, headers={"Content-Type": "application/json"}
    )


def _oauth_error(error: str, status: int = 400) -> HTTPResponse:
    return _json({"error": error}, status)


# -- the plugin -------------------------------------------------------------


class AccessControl:
    """Bottle plugin deciding, per request, whether to serve and whether to build."""

    name = "nixery-access-control"
    api = 2

    def __init__(self, authenticator: Authenticator | None, read_only_cache: bool):
        self.authenticator = authenticator
        self.read_only_cache = read_only_cache

    def setup(self, app: Any) -> None:
        if self.authenticator is not None:
            for path, methods, callback in self.authenticator.routes():
                app.route(path, methods, callback, public=True)

    def apply(self, callback: Callable[..., Any], route: Any) -> Callable[..., Any]:
        if route.config.get("public"):
            return callback

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            identity = self._admit(kwargs.get("name"))
            request.environ[IDENTITY] = identity
            request.environ[MAY_BUILD] = not self.read_only_cache or not identity.anonymous
            if self.authenticator is None or not identity.anonymous:
                return callback(*args, **kwargs)
            return self._anonymous_call(callback, kwargs.get("name"), args, kwargs)

        return wrapper

    def _admit(self, name: str | None) -> Identity:
        """The caller's identity, or a 401 that tells the client how to log in."""
        auth = self.authenticator
        if auth is None:
            return ANONYMOUS
        scope = f"repository:{name}:pull" if name and NAME_RE.fullmatch(name) else None
        try:
            identity = auth.identify(request)
        except InvalidCredentials as exc:
            raise self._unauthorized(str(exc), scope, "invalid_token") from None
        if identity.anonymous:
            # Anonymous clients may only pull, and only with --read-only-cache.
            # The base endpoint challenges them so that clients with
            # credentials log in; an anonymous token passes it.
            if identity.token and request.path == "/v2/":
                return identity
            if not (self.read_only_cache and name and request.method in PULL_METHODS):
                raise self._unauthorized("authentication required", scope)
            if not identity.may_pull(name):
                raise self._unauthorized("token does not grant this repository", scope)
            return identity
        if name and not identity.may_pull(name):
            raise self._unauthorized(
                "token does not grant this repository", scope, "insufficient_scope"
            )
        return identity

    def _anonymous_call(
        self, callback: Callable[..., Any], name: str | None, args: Any, kwargs: Any
    ) -> Any:
        """Serve an anonymous pull without revealing anything beyond the cache."""
        scope = f"repository:{name}:pull" if name else None
        try:
            return callback(*args, **kwargs)
        except BuildNotAllowed:
            raise self._unauthorized("authentication required to build images", scope) from None
        except RegistryError as exc:
            if exc.code.status < 500:
                raise
            log.error("request failed: %s", exc)
        except HTTPResponse:
            raise
        except NixeryError as exc:
            log.error("request failed: %s", exc)
        except Exception:
            log.exception("unexpected error")
        raise RegistryError(ErrorCode.UNKNOWN) from None

    def _unauthorized(self, message: str, scope: str | None, error: str | None = None) -> Any:
        assert self.authenticator is not None
        challenge = self.authenticator.challenge(request, scope, error)
        return RegistryError(
            ErrorCode.UNAUTHORIZED, message=message, headers={"WWW-Authenticate": challenge}
        )


def make_access_control(
    auth: str | None,
    read_only_cache: bool,
    token_key_file: str | None = None,
    token_realm: str | None = None,
) -> AccessControl | None:
    """Build the plugin from `--auth` (`htpasswd:FILE` or `token:FILE`), or None when open."""
    if not auth:
        return AccessControl(None, True) if read_only_cache else None
    kind, sep, path = auth.partition(":")
    if not sep or not path:
        raise ConfigError(f"--auth must be htpasswd:FILE or token:FILE, got {auth!r}")
    users = Htpasswd(path)
    if kind == "htpasswd":
        return AccessControl(BasicAuth(users), read_only_cache)
    if kind == "token":
        key = load_token_key(token_key_file)
        return AccessControl(TokenAuth(users, key, read_only_cache, token_realm), read_only_cache)
    raise ConfigError(f"unknown --auth kind {kind!r}: use htpasswd:FILE or token:FILE")
