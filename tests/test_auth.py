"""Access control against the real server and real clients (skopeo, podman, ctr)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import jwt
import pytest

from nixery.errors import ConfigError
from nixery.http.auth import parse_htpasswd, parse_scopes
from tests.attack import make_tracing_path, read_trace, write_htpasswd
from tests.clients import run
from tests.conftest import Server, StartServer, require
from tests.http import Reply, call

USER, PASSWORD = "alice", "correct horse"
CREDS = f"{USER}:{PASSWORD}"


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def challenge(reply: Reply) -> tuple[str, dict[str, str]]:
    scheme, _, params = (reply.header("WWW-Authenticate") or "").partition(" ")
    return scheme, dict(re.findall(r'(\w+)="([^"]*)"', params))


def assert_unauthorized(reply: Reply) -> None:
    assert reply.status == 401, (reply.status, reply.body)
    assert reply.error_codes() == ["UNAUTHORIZED"]
    assert reply.header("WWW-Authenticate")


def get_token(server: Server, *scopes: str, headers: dict[str, str] | None = None) -> Reply:
    query = urllib.parse.urlencode([("service", "nixery"), *(("scope", s) for s in scopes)])
    return call(server.host, "GET", f"/token?{query}", headers)


# -- units -------------------------------------------------------------------------


def test_parse_scopes_grants_only_pull_on_valid_names() -> None:
    granted = parse_scopes(
        ["repository:shell/git:pull,push", "repository:Bad:pull repository:ok:push",
         "registry:catalog:*", "repository:a:pull", "repository:../x:pull"]
    )  # fmt: skip
    assert granted == {"shell/git", "a"}


def test_htpasswd_accepts_only_bcrypt(tmp_path: Path) -> None:
    users = parse_htpasswd(write_htpasswd(tmp_path / "h", {"a": "x"}).read_text(), "h")
    assert set(users) == {"a"}
    for line in ("a:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=", "a:$apr1$x$y", "nocolon"):
        with pytest.raises(ConfigError):
            parse_htpasswd(line, "h")


# -- htpasswd (HTTP Basic) ------------------------------------------------------------


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    return write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD, "bob": "hunter2"})


@pytest.mark.e2e
def test_basic_auth_refuses_anonymous_and_wrong_passwords(
    start_server: StartServer, htpasswd: Path
) -> None:
    server = start_server("--auth", f"htpasswd:{htpasswd}")
    for path in ("/v2/", "/v2/hello/manifests/latest", "/v2/nope/manifests/latest", "/",
                 "/builds", "/metrics", "/v2/hello/blobs/sha256:" + "0" * 64,
                 "/v2/hello/tags/list"):  # fmt: skip
        reply = call(server.host, "GET", path)
        assert_unauthorized(reply)
        assert challenge(reply) == ("Basic", {"realm": "nixery", "charset": "UTF-8"})
    for headers in (basic(password="wrong"), basic(user="mallory"), {"Authorization": "Basic !!"},
                    {"Authorization": "Bearer x"}):  # fmt: skip
        assert_unauthorized(call(server.host, "GET", "/v2/", headers))
    assert call(server.host, "GET", "/v2/", basic()).status == 200
    assert call(server.host, "GET", "/", basic()).status == 200
    assert call(server.host, "GET", "/healthz").status == 200  # probes have no credentials
    assert call(server.host, "GET", "/livez").status == 200
    # Nothing was built for the refused requests.
    assert "built " not in server.log_text()


@pytest.mark.e2e
def test_skopeo_and_podman_log_in_with_basic_auth(
    start_server: StartServer, htpasswd: Path, tmp_path: Path
) -> None:
    require("skopeo", "podman")
    server = start_server("--auth", f"htpasswd:{htpasswd}")
    refused = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{server.host}/hello"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "unauthorized" in refused.stderr.lower()
    inspect = run(["skopeo", "inspect", "--tls-verify=false", "--creds", CREDS,
                   f"docker://{server.host}/hello"])  # fmt: skip
    assert json.loads(inspect.stdout)["Layers"]
    podman_pull(server, "hello", tmp_path, creds=CREDS)


# -- the token flow -------------------------------------------------------------------


@pytest.fixture
def token_server(start_server: StartServer, htpasswd: Path, tmp_path: Path) -> Server:
    return start_server("--auth", f"token:{htpasswd}", "--auth-key", str(tmp_path / "token.key"))


@pytest.mark.e2e
def test_token_flow_challenges_and_scopes(token_server: Server, tmp_path: Path) -> None:
    server = token_server
    reply = call(server.host, "GET", "/v2/")
    assert_unauthorized(reply)
    scheme, params = challenge(reply)
    assert scheme == "Bearer"
    assert params == {"realm": f"http://{server.host}/token", "service": "nixery"}
    scheme, params = challenge(call(server.host, "GET", "/v2/hello/manifests/latest"))
    assert params["scope"] == "repository:hello:pull"
    # Clients choose X-Forwarded-*: they must not move the realm elsewhere.
    forwarded = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    assert challenge(call(server.host, "GET", "/v2/", forwarded))[1]["realm"] == params["realm"]

    assert_unauthorized(get_token(server, "repository:hello:pull"))  # anonymous
    assert_unauthorized(get_token(server, "repository:hello:pull", headers=basic("x", "y")))
    granted = get_token(server, "repository:hello:pull", headers=basic())
    assert granted.status == 200
    body = granted.json()
    assert body["token"] == body["access_token"] and 0 < body["expires_in"] <= 300
    token = body["token"]

    manifest = call(server.host, "GET", "/v2/hello/manifests/latest", bearer(token))
    assert manifest.status == 200
    layer = manifest.json()["layers"][0]["digest"]
    assert call(server.host, "GET", f"/v2/hello/blobs/{layer}", bearer(token)).status == 200

    # A token for one repository opens no other, not even for a blob it knows.
    for path in ("/v2/jq/manifests/latest", f"/v2/jq/blobs/{layer}", "/v2/hello/jq/tags/list"):
        refused = call(server.host, "GET", path, bearer(token))
        assert_unauthorized(refused)
        assert challenge(refused)[1]["error"] == "insufficient_scope"
    assert "built jq" not in server.log_text()

    # Forged, expired and foreign tokens are refused.
    key = (tmp_path / "token.key").read_bytes().strip()
    claims = jwt.decode(token, key, algorithms=["HS256"], audience="nixery")
    forged = [
        token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"),
        jwt.encode({**claims, "exp": int(time.time()) - 60}, key, algorithm="HS256"),
        jwt.encode(claims, b"k" * 32, algorithm="HS256"),
        jwt.encode(claims, None, algorithm="none"),
        jwt.encode({**claims, "aud": "other"}, key, algorithm="HS256"),
    ]
    for bad in forged:
        assert_unauthorized(call(server.host, "GET", "/v2/hello/manifests/latest", bearer(bad)))

    # The OAuth2 password grant (docker login) issues the same kind of token.
    form = urllib.parse.urlencode({"grant_type": "password", "username": USER,
                                   "password": PASSWORD, "service": "nixery",
                                   "scope": "repository:hello:pull"})  # fmt: skip
    posted = call_post(server.host, "/token", form)
    assert posted.status == 200
    assert call(server.host, "GET", "/v2/hello/manifests/latest",
                bearer(posted.json()["access_token"])).status == 200  # fmt: skip
    bad_form = form.replace("horse", "pony")
    assert call_post(server.host, "/token", bad_form).status == 401


@pytest.mark.e2e
def test_skopeo_podman_and_ctr_log_in_with_tokens(token_server: Server, tmp_path: Path) -> None:
    require("skopeo", "podman", "containerd", "ctr")
    server = token_server
    refused = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{server.host}/hello"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0
    run(["skopeo", "copy", "--src-tls-verify=false", "--src-creds", CREDS,
         f"docker://{server.host}/hello", f"oci:{tmp_path / 'oci'}:latest"])  # fmt: skip
    assert json.loads((tmp_path / "oci" / "index.json").read_text())["manifests"]
    podman_pull(server, "hello", tmp_path, creds=CREDS)
    with containerd(tmp_path) as ctr:
        ref = f"{server.host}/hello:latest"
        failed = subprocess.run(
            [*ctr, "image", "pull", "--plain-http", ref],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert failed.returncode != 0
        run([*ctr, "image", "pull", "--plain-http", "--user", CREDS,
             f"{server.host}/hello:latest"])  # fmt: skip


# -- read-only cache --------------------------------------------------------------------


@pytest.mark.e2e
def test_read_only_cache_serves_only_built_images(
    start_server: StartServer, htpasswd: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    builder = start_server(storage=storage)
    assert call(builder.host, "GET", "/v2/hello/manifests/latest").status == 200
    builder.stop()

    trace = tmp_path / "trace.jsonl"
    env = {"PATH": make_tracing_path(tmp_path / "bin", trace)}
    # Without authentication nobody builds.
    cache = start_server("--read-only-cache", storage=storage, env=env)
    assert call(cache.host, "GET", "/v2/hello/manifests/latest").status == 200
    missing = call(cache.host, "GET", "/v2/jq/manifests/latest")
    assert missing.status == 404 and missing.error_codes() == ["MANIFEST_UNKNOWN"]
    assert read_trace(trace) == []
    cache.stop()

    # With authentication, anonymous clients pull what is cached; users build.
    server = start_server("--read-only-cache", "--auth", f"token:{htpasswd}", storage=storage,
                          env=env)  # fmt: skip
    run(["skopeo", "inspect", "--tls-verify=false", f"docker://{server.host}/hello"])
    anonymous = get_token(server, "repository:jq:pull").json()["token"]
    refused = call(server.host, "GET", "/v2/jq/manifests/latest", bearer(anonymous))
    assert_unauthorized(refused)  # a 401, so a client with credentials logs in
    assert "jq" not in json.dumps(refused.json()["errors"][0].get("detail", ""))
    assert read_trace(trace) == []
    # Anonymous clients see no unknown-package lists, no front page, no other route.
    assert_unauthorized(call(server.host, "GET", "/v2/nope/manifests/latest", bearer(anonymous)))
    for page in ("/", "/builds", "/builds.json", "/packages/hello", "/metrics"):
        assert_unauthorized(call(server.host, "GET", page))  # the front page names packages
    assert_unauthorized(call(server.host, "DELETE", "/v2/hello/manifests/latest"))
    run(["skopeo", "inspect", "--tls-verify=false", "--creds", CREDS,
         f"docker://{server.host}/jq"])  # fmt: skip
    assert any(c["tool"] == "nix-instantiate" for c in read_trace(trace))


@pytest.mark.e2e
def test_tokens_open_only_the_repositories_and_actions_they_grant(
    start_server: StartServer, htpasswd: Path, tmp_path: Path
) -> None:
    """Every token against hello's manifest and blobs on a read-only cache:
    issued anonymously or to a user, for hello or another name, and signed
    tokens whose access lists other actions or other resource types."""
    storage = tmp_path / "storage"
    builder = start_server(storage=storage)
    manifest = call(builder.host, "GET", "/v2/hello/manifests/latest")
    assert manifest.status == 200
    digest = manifest.require_header("Docker-Content-Digest")
    blob_digests = [manifest.json()["config"]["digest"], manifest.json()["layers"][0]["digest"]]
    builder.stop()

    key_file = tmp_path / "token.key"
    server = start_server("--read-only-cache", "--auth", f"token:{htpasswd}",
                          "--auth-key", str(key_file), storage=storage)  # fmt: skip
    paths = ["/v2/hello/manifests/latest", f"/v2/hello/manifests/{digest}"]
    paths += [f"/v2/hello/blobs/{blob}" for blob in blob_digests]

    def issued(scope: str, headers: dict[str, str] | None = None) -> str:
        reply = get_token(server, scope, headers=headers)
        assert reply.status == 200, reply.body
        return str(reply.json()["token"])

    key = key_file.read_bytes().strip()
    template = jwt.decode(issued("repository:hello:pull", basic()), key,
                          algorithms=["HS256"], audience="nixery")  # fmt: skip

    def signed(sub: str, *access: dict[str, object]) -> str:
        return jwt.encode({**template, "sub": sub, "access": list(access)}, key, "HS256")

    hello: dict[str, object] = {"type": "repository", "name": "hello"}
    granted = {
        "anonymous, hello:pull": issued("repository:hello:pull"),
        "user, hello:pull": issued("repository:hello:pull", basic()),
        "signed user, pull": signed(USER, {**hello, "actions": ["pull"]}),
        "signed anonymous, push and pull": signed("", {**hello, "actions": ["push", "pull"]}),
    }
    refused = {
        "anonymous, jq:pull": issued("repository:jq:pull"),
        "anonymous, hello:push": issued("repository:hello:push"),
        "user, jq:pull": issued("repository:jq:pull", basic()),
        "user, hello:push": issued("repository:hello:push", basic()),
        "user, no scope": issued("registry:catalog:*", basic()),
        "signed user, push": signed(USER, {**hello, "actions": ["push"]}),
        "signed user, push and delete": signed(USER, {**hello, "actions": ["push", "delete"]}),
        "signed user, no actions": signed(USER, {**hello, "actions": []}),
        "signed user, actions missing": signed(USER, hello),
        "signed user, pull as text": signed(USER, {**hello, "actions": "pul"}),
        "signed user, other type": signed(USER, {**hello, "type": "registry", "actions": ["pull"]}),
        "signed user, other name": signed(USER, {**hello, "name": "jq", "actions": ["pull"]}),
        "signed anonymous, push": signed("", {**hello, "actions": ["push"]}),
        "signed anonymous, jq": signed("", {**hello, "name": "jq", "actions": ["pull"]}),
    }
    for label, token in granted.items():
        for path in paths:
            for method in ("GET", "HEAD"):
                reply = call(server.host, method, path, bearer(token))
                assert reply.status == 200, (label, method, path, reply.status)
    for label, token in refused.items():
        for path in paths:
            for method in ("GET", "HEAD"):
                reply = call(server.host, method, path, bearer(token))
                assert reply.status == 401, (label, method, path, reply.status)
                assert challenge(reply)[1]["scope"] == "repository:hello:pull", label
    # Nothing was built: every image came from the cache, or was refused.
    assert "build started" not in server.log_text()


def call_post(host: str, path: str, form: str) -> Reply:
    import http.client

    conn = http.client.HTTPConnection(host, timeout=60)
    try:
        conn.request(
            "POST", path, body=form, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


# -- real clients with private state -------------------------------------------------------


def podman_pull(server: Server, image: str, tmp_path: Path, creds: str | None = None) -> None:
    # podman wants a short runroot (under 50 characters).
    with tempfile.TemporaryDirectory(prefix="np-") as short:
        _podman_pull(server, image, tmp_path, Path(short), creds)


def _podman_pull(
    server: Server, image: str, tmp_path: Path, state: Path, creds: str | None
) -> None:
    registries = tmp_path / "registries.conf"
    registries.write_text(
        f'unqualified-search-registries = []\n[[registry]]\nlocation = "{server.host}"\n'
        "insecure = true\n"
    )
    argv = ["podman", "--root", str(state / "root"), "--runroot", str(state / "run"),
            "--tmpdir", str(state / "tmp"), "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file",
            "pull", "-q", "--tls-verify=false"]  # fmt: skip
    if creds:
        argv += ["--creds", creds]
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(registries)}
    proc = subprocess.run(
        [*argv, f"{server.host}/{image}"], capture_output=True, text=True, env=env, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"[0-9a-f]{64}\n", proc.stdout), proc.stdout


class containerd:  # noqa: N801 - used as a context manager like a function
    """A private containerd daemon; yields the ctr argv prefix."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path

    def __enter__(self) -> list[str]:
        # Unix socket paths are short; pytest's are long.
        self.dir = Path(tempfile.mkdtemp(prefix="nc-"))
        config = self.dir / "config.toml"
        config.write_text(
            f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.dir}/sock"\n[ttrpc]\n  address = "{self.dir}/sock.ttrpc"\n'
        )
        self.log = open(self.dir / "containerd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        ctr = ["ctr", "-a", str(self.dir / "sock"), "-n", "nixery-test"]
        for _ in range(100):
            if subprocess.run([*ctr, "version"], capture_output=True).returncode == 0:
                return ctr
            time.sleep(0.1)
        self.__exit__()
        raise AssertionError("containerd did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.copy(self.dir / "containerd.log", self.tmp_path / "containerd.log")
        shutil.rmtree(self.dir, ignore_errors=True)
