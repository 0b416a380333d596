"""Hostile names, tags and digests against the real server, with Nix and git traced.

Every request must get a 4xx; no traced tool may see request data anywhere
but in the JSON arguments file, and there only as validated attribute
names; the server must keep serving.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixery.packages.names import NAME_RE, TAG_RE
from tests.attack import STORE_PATH, make_tracing_path, raw_request, read_trace
from tests.conftest import Server, StartServer
from tests.sourcefixtures import make_pkgs_repo

pytestmark = pytest.mark.e2e

CANARY = "/tmp/nixery-hostile-canary"
ZERO = "sha256:" + "0" * 64

NIX_CODE = [
    '${builtins.abort "x"}', '"; builtins.abort "x"; "', "builtins.abort", "builtins.readfile",
    "builtins.exec", "builtins.fetchurl", "(import /etc/passwd)", "import", "__nixPath",
    "<nixpkgs>", "let x = 1; in x", "rec { a = a; }", "with builtins; abort", "a:b", "x: x",
    "''${x}''", "# comment", "/* c */", "${toString 1}", "{ }", "[ ]", 'hello"', "hello'",
    "hello\\", 'builtins.getEnv "HOME"', 'throw "x"', "assert false; 1", "1 + 1", "./x", "~/x",
    "hello.${x}", 'hello."x"', "or", "pkgs.lib", "lib.mkforce", "hello.override",
    "hello.overrideattrs", "builtins.currentsystem", "true", "null", "builtins", "abort",
    "derivation", "builtins.tryeval", "import <nixpkgs> {}", "(x: x) 1", "@{", "inherit",
    "builtins.storepath", "builtins.path", "pkgs.hello.drvpath", "__functor",
]  # fmt: skip
SHELL = [
    f"$(touch {CANARY})", f"`touch {CANARY}`", f";touch {CANARY}", f"|touch {CANARY}",
    f"&& touch {CANARY}", f"> {CANARY}", "hello;rm -rf /", "$IFS", "${IFS}", "\n", "\r\n",
    "hello\r\nX-Injected: 1", "$PATH", "%(x)s", "{{7*7}}", "${jndi:ldap://x}",
]  # fmt: skip
OPTIONS = [
    "-", "--", "-rf", "--help", f"--upload-pack=touch {CANARY}", "--upload-pack", "-c",
    f"-ccore.sshCommand=touch {CANARY}", "--output=/tmp/x", "--eval", "-E", "--option",
    "--expr", "--add-root", "-uhello", f"--exec=touch {CANARY}", "--config=/etc/passwd",
    "-I", "-Inixpkgs=/tmp", "--arg", "--argstr", "-A",
]  # fmt: skip
TRAVERSAL = [
    "..", "../..", "../../etc/passwd", "%2e%2e", "%2e%2e%2f%2e%2e%2fetc", "..%2f..%2fetc",
    "%252e%252e", ".", "./.", "hello/../../x", "/etc/passwd", "//", "hello//curl", "hello/",
    "/hello", "..;", "....//", ".%00.", "%2f", "hello%2fcurl", "\\..\\..", "..\\..\\windows",
    "hello/..", "hello/./curl", "%2e", "..%00", "..././", ".../...", "%c0%ae%c0%ae",
    "..%5c..%5c", "a/b/../c",
]  # fmt: skip
ENCODING = [
    "%00", "hello%00", "hello%00.json", "%0d%0aX-Injected:%201", "%ff", "%c0%af", "%e2%80%ae",
    "%09", "hello%20world", "%u002e", "%", "%%", "%zz", "\x00", "hello\x00", "\x7f", "\t",
]  # fmt: skip
UNICODE = [
    "h\u0435llo", "\uff48\uff45\uff4c\uff4c\uff4f", "hello\u200b", "\u210cello", "hel\u0131o",
    "\u2160", "\u01c5", "he\u0301llo", "\u202eolleh", "\uff53\uff48\uff41\uff12\uff15\uff16",
    "\u00df", "\u0130", "\ufb01", "\U0001f600", "hello\ufeff", "\u0430",
    "\u2024\u2024", "\uff0e\uff0e", "hello\u2215curl", "hello\u2044curl", "hello\uff0fcurl",
]  # fmt: skip
SPECIAL = [
    "Hello", "HELLO", f"hello@{ZERO}", "hello:latest", "hello?x=1", "hello#frag", "*", "?",
    "[a]", "{a}", "+", "=", ",", "!", "~", "^", "a..b", "a__", "_a", "a-", "-a", ".a", "a.",
    "a_-b", "a;b", "a&b", "a|b", "a$b", "@", "latest:x",
]  # fmt: skip
LONG = ["a" * 256, "a" * 5000, "/".join(["a"] * 65), "a" * 129, "a." * 200 + "a"]
DIGESTS = [
    "sha256:", "sha256:abc", "sha256:" + "g" * 64, "sha256:" + "A" * 64, "sha256:" + "0" * 63,
    "sha256:" + "0" * 65, "md5:abc", "sha512:" + "0" * 128, "sha256:../../etc/passwd",
    "sha256:%2e%2e", ":abc", "sha256::", "SHA256:" + "0" * 64, ZERO + "/../x", ZERO + "%00",
    ZERO + ".json", "sha256:" + "0" * 32 + "/" + "0" * 31, "sha256:-" + "0" * 63,
]  # fmt: skip

PAYLOADS = list(
    dict.fromkeys(
        NIX_CODE + SHELL + OPTIONS + TRAVERSAL + ENCODING + UNICODE + SPECIAL + LONG + DIGESTS
    )
)
POSITIONS = {
    "name": "/v2/{}/manifests/latest",
    "reference": "/v2/hello/manifests/{}",
    "blob-name": "/v2/{}/blobs/" + ZERO,
    "digest": "/v2/hello/blobs/{}",
    "tags-name": "/v2/{}/tags/list",
    "package-page": "/packages/{}",
}

ROOTS = r"/[\w/.-]*/nixery-gc-roots/build-\d+-\w+"
# Evaluated to JSON, or (while a build holds roots) instantiated and rooted.
RESOLVE_ARGV = re.compile(
    rf"(?:--eval --strict --json --read-write-mode|--add-root {ROOTS}/resolution --indirect) "
    r"(?:--option \S+ \S+ )*"
)
RESOLVE_ARGS = {
    "source", "system", "packages", "overlays", "describe", "listAttributes", "metadata",
    "instantiate",
}  # fmt: skip
ATTRIBUTE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
NIX_STORE_FLAGS = {
    "--realise", "--timeout", "--add-root", "--query", "--requisites", "--dump-db", "--binding",
    "result",
}  # fmt: skip


def targets(payload: str) -> Iterator[bytes]:
    """The payload sent raw (as UTF-8) and fully percent-encoded."""
    yield payload.encode("utf-8", "surrogatepass")
    yield urllib.parse.quote(payload, safe="").encode()


def corpus() -> list[tuple[str, bytes]]:
    cases = []
    for position, template in POSITIONS.items():
        for payload in PAYLOADS:
            for encoded in targets(payload):
                cases.append((position, template.encode().replace(b"{}", encoded)))
    return cases


@pytest.fixture(scope="module")
def traced(
    start_module_server: StartServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Server, Path]:
    base = tmp_path_factory.mktemp("hostile")
    log = base / "trace.jsonl"
    server = start_module_server(env={"PATH": make_tracing_path(base / "bin", log)})
    return server, log


def assert_served_as_data(trace: list[dict], own_dirs: tuple[str, ...] = ()) -> None:
    """Nix saw request data only as attribute names inside its JSON args file.

    `own_dirs`: directories of the server's own (GC roots of package sources).
    """
    assert trace, "the traced tools were never called"
    for call in trace:
        argv = call["argv"]
        if call["tool"] == "nix-instantiate":
            text = " ".join(argv)
            assert RESOLVE_ARGV.match(text), argv
            assert argv[-3:-1] == ["--argstr", "argsFile"], argv
            assert argv[-4].endswith("/nixexprs/resolve.nix"), argv
            args = json.loads(call["args"])
            assert set(args) <= RESOLVE_ARGS and isinstance(args["packages"], list), args
            assert isinstance(args.get("metadata", False), bool), args
            assert isinstance(args.get("instantiate", False), bool), args
            for package in args["packages"]:
                assert ATTRIBUTE.fullmatch(package), package
        elif call["tool"] == "nix-store":
            for arg in argv:
                plain = arg.split("!", 1)[0]
                assert (
                    arg in NIX_STORE_FLAGS
                    or arg.isdigit()
                    or STORE_PATH.fullmatch(plain)
                    or re.fullmatch(rf"{ROOTS}/(out|resolution)", arg)
                    or arg.startswith(own_dirs)
                ), (arg, argv)
        elif call["tool"] == "nix" and argv[2:5] == ["path-info", "--recursive", "--json"]:
            assert argv[:2] == ["--extra-experimental-features", "nix-command"], argv
            for arg in argv[5:]:
                assert STORE_PATH.fullmatch(arg), (arg, argv)
        else:
            raise AssertionError(f"unexpected tool call {call}")


def accepted(position: str, target: bytes) -> bool:
    """The few payloads that are fine: a raw '?' leaves only the base endpoint,
    a name valid in the grammar may list its tags (nothing runs for it), and
    the front page's package view answers a page."""
    path = urllib.parse.unquote_to_bytes(target.split(b"?", 1)[0])
    if path == b"/v2/" or position == "package-page":
        return True  # the front page describes any valid-looking name
    listing = re.fullmatch(rb"/v2/(.+)/tags/list", path)
    return (
        position == "tags-name"
        and listing is not None
        and NAME_RE.fullmatch(listing.group(1).decode("latin-1")) is not None
    )


def test_hostile_corpus(traced: tuple[Server, Path]) -> None:
    server, log = traced
    cases = corpus()
    assert len(PAYLOADS) >= 200 and len(cases) >= 1000
    failures = []
    for position, target in cases:
        reply = raw_request(server.host, target)
        if reply.status == 200 and accepted(position, target):
            continue
        if not 400 <= reply.status < 500:
            failures.append((position, target[:120], reply.status, reply.body[:200]))
    assert not failures, f"{len(failures)} requests were not refused:\n" + "\n".join(
        map(repr, failures[:20])
    )
    assert not Path(CANARY).exists()
    assert_served_as_data(read_trace(log))
    # Still serving, and still building.
    assert raw_request(server.host, b"/v2/").status == 200
    assert raw_request(server.host, b"/v2/hello/manifests/latest").status == 200


def test_invalid_input_starts_nothing(traced: tuple[Server, Path]) -> None:
    """Grammar violations are answered before any tool runs."""
    server, log = traced
    before = len(read_trace(log))
    for target in [b"/v2/Hello/manifests/latest", b"/v2/a/b%2f..%2f/manifests/latest",
                   b"/v2/hello/manifests/-x", b"/v2/" + b"/".join([b"a"] * 65) + b"/manifests/x",
                   b"/v2/%24%7Bbuiltins.abort%7D/manifests/latest"]:  # fmt: skip
        reply = raw_request(server.host, target)
        assert reply.status == 400, (target, reply.status)
        assert json.loads(reply.body)["errors"][0]["code"] in {"NAME_INVALID", "TAG_INVALID"}
    assert len(read_trace(log)) == before


def test_too_many_packages_is_name_invalid(traced: tuple[Server, Path]) -> None:
    server, _ = traced
    name = "/".join(f"p{i}" for i in range(65)).encode()
    reply = raw_request(server.host, b"/v2/" + name + b"/manifests/latest")
    assert reply.status == 400
    error = json.loads(reply.body)["errors"][0]
    assert error["code"] == "NAME_INVALID" and "64" in error["detail"]["reason"]


# -- property-based: the router over arbitrary paths ---------------------------------

# Built up from parts: hypothesis' own regex strategy is very slow on NAME_RE.
alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
separator = st.sampled_from([".", "_", "__", "-", "--"])
name_component = st.tuples(st.lists(alnum, min_size=1, max_size=3), separator).map(
    lambda t: t[1].join(t[0])
)
segment = st.one_of(
    st.text(max_size=40),
    name_component,
    st.sampled_from(["..", ".", "", "v2", "manifests", "blobs", "tags", "list", "uploads"]),
)
reference = st.one_of(
    st.text(max_size=140),
    st.from_regex(TAG_RE, fullmatch=True).filter(lambda s: s != "latest"),
    st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True),
    st.from_regex(r"[a-z0-9]{1,10}:[A-Za-z0-9=_-]{1,70}", fullmatch=True),
)
suffix = st.sampled_from(["manifests", "blobs", "tags/list", "blobs/uploads", ""])


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    segments=st.lists(segment, min_size=0, max_size=6),
    suffix=suffix,
    ref=reference,
    method=st.sampled_from([b"GET", b"HEAD", b"DELETE", b"PUT", b"POST", b"PATCH"]),
    quote=st.booleans(),
)
def test_router_answers_4xx(
    traced: tuple[Server, Path],
    segments: list[str],
    suffix: str,
    ref: str,
    method: bytes,
    quote: bool,
) -> None:
    server, _ = traced
    parts = ["v2", *segments, *([suffix] if suffix else []), ref]
    if quote:
        path = "/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)
        target = path.encode()
    else:
        target = ("/" + "/".join(parts)).encode("utf-8", "surrogatepass")
    reply = raw_request(server.host, target, method=method)
    # With a path source no tag but `latest` (never generated) names an image,
    # and no generated digest exists: only the base and tag list may succeed.
    decoded = urllib.parse.unquote("/" + "/".join(parts))
    listing = re.fullmatch(r"/v2/?|/v2/(.+)/tags/list", decoded)
    succeeds = (
        reply.status == 200
        and method in (b"GET", b"HEAD")
        and listing is not None
        and (listing.group(1) is None or NAME_RE.fullmatch(listing.group(1)) is not None)
    )
    assert 400 <= reply.status < 500 or succeeds, (target, reply.status, reply.body[:200])


# -- a git source: tags are where refs come from ----------------------------------------

GIT_FLAGS = {"--git-dir", "--quiet", "--bare", "--prune", "--no-tags", "--format=tar", "-o",
             "-e", "init", "fetch", "ls-remote", "archive", "cat-file", "HEAD"}  # fmt: skip


def test_hostile_tags_never_reach_git(start_server: StartServer, tmp_path: Path) -> None:
    repo = make_pkgs_repo(tmp_path / "pkgs")
    log = tmp_path / "trace.jsonl"
    cache = tmp_path / "cache"
    server = start_server(
        "--pkgs-repo", repo.url, "--source-cache", str(cache),
        env={"PATH": make_tracing_path(tmp_path / "bin", log)},
    )  # fmt: skip
    failures = []
    for payload in PAYLOADS:
        for encoded in targets(payload):
            reply = raw_request(server.host, b"/v2/hello/manifests/" + encoded)
            if not 400 <= reply.status < 500:
                failures.append((encoded[:80], reply.status, reply.body[:200]))
    assert not failures, failures[:20]
    assert raw_request(server.host, b"/v2/hello/manifests/v1").status == 200
    calls = [c for c in read_trace(log) if c["tool"] == "git"]
    assert calls
    for call in calls:
        for arg in call["argv"]:
            assert (
                arg in GIT_FLAGS
                or arg == repo.url
                or arg.startswith(str(cache))
                or re.fullmatch(r"[0-9a-f]{40}(\^\{commit\})?", arg)
                or re.fullmatch(r"\+?refs/(heads|tags)/\*(:refs/(heads|tags)/\*)?", arg)
                or re.fullmatch(r"--prefix=[\w.-]+/", arg)
                or re.fullmatch(r"/[\w/.-]+\.tar", arg)
            ), (arg, call["argv"])
    assert_served_as_data([c for c in read_trace(log) if c["tool"] != "git"], (str(cache),))
