"""End to end: docs/organisations.md, run as written.

Every `sh` block of the page runs in order, in bash, in one working
directory; only the page's first block (its settings) is replaced by the
test's own: the offline test package set instead of nixpkgs, a bare local
repository as the git server, a free port, plain HTTP and a TTL of 0. The
block that starts `nixery serve` runs in the background. Then the test
checks what the commands produced: the pulled images, auth, the build
failure as clients and the web page see it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.clients import bwrap_run, umoci_unpack
from tests.conftest import free_port, require, wait_for
from tests.http import call
from tests.sourcefixtures import GIT_ENV

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "organisations.md"
PINNED = Path(__file__).parent / "fixtures" / "organisation" / "pinned"
MODULE = ROOT / "nix" / "modules" / "nixery.nix"
BLOCK_RE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
SETTINGS_MARK = "# Your settings"
OCI = "application/vnd.oci.image.manifest.v1+json"

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def page_blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK_RE.findall(PAGE.read_text()) if lang == language]


def exported_names(script: str) -> set[str]:
    """The variables a settings block exports."""
    names: set[str] = set()
    for line in script.splitlines():
        if line.startswith("export "):
            names |= set(re.findall(r"(?:^export |\s)([A-Z_][A-Z0-9_]*)=", line))
    return names


def settings_for(work: Path, port: int) -> dict[str, str]:
    remote = work / "remote.git"
    return {
        "PINNED": str(PINNED),
        "REPO_URL": remote.as_uri(),
        "WORK": str(work),
        "LISTEN": "127.0.0.1",
        "PORT": str(port),
        "REGISTRY": f"127.0.0.1:{port}",
        "REGISTRY_URL": f"http://127.0.0.1:{port}",
        "TLS_VERIFY": "false",
        "TTL": "0",
        "CI_PASSWORD": "ci-secret",
        "ALICE_PASSWORD": "alice-secret",
    }


def test_the_page_and_the_test_set_the_same_variables(tmp_path: Path) -> None:
    [settings, *_] = page_blocks("sh")
    assert settings.startswith(SETTINGS_MARK)
    assert exported_names(settings) == set(settings_for(tmp_path, 1))
    # Nothing else in the page is left out of the run.
    assert not any(SETTINGS_MARK in block for block in page_blocks("sh")[1:])


@dataclass
class Run:
    work: Path
    env: dict[str, str]
    outputs: list[tuple[str, str]]  # (block, its stdout)
    server_log: Path

    def output_of(self, fragment: str) -> str:
        [out] = [out for block, out in self.outputs if fragment in block]
        return out

    def creds(self, user: str) -> dict[str, str]:
        password = self.env[f"{user.upper()}_PASSWORD"]
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}

    @property
    def host(self) -> str:
        return self.env["REGISTRY"]


def run_block(block: str, work: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"{block}\nfailed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def page_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    require("git", "skopeo", "umoci", "bwrap", "htpasswd", "jq", "curl")
    work = tmp_path_factory.mktemp("organisation")
    settings = settings_for(work, free_port())
    # The organisation's git server, with an empty repository.
    subprocess.run(
        ["git", "init", "--quiet", "--bare", "--initial-branch=main", str(work / "remote.git")],
        check=True,
    )
    bin_dir = str(Path(sys.executable).parent)  # where `nixery` is installed
    env = {
        **os.environ,
        **GIT_ENV,
        **settings,
        "PATH": bin_dir + os.pathsep + os.environ["PATH"],
    }
    log = work / "server.log"
    server: subprocess.Popen[bytes] | None = None
    outputs = []
    try:
        for block in page_blocks("sh")[1:]:
            if block.startswith("nixery serve"):
                with open(log, "wb") as fh:
                    server = subprocess.Popen(
                        ["bash", "-euo", "pipefail", "-c", block],
                        cwd=work,
                        env=env,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                wait_for(settings["REGISTRY_URL"] + "/v2/")
                outputs.append((block, ""))
            else:
                outputs.append((block, run_block(block, work, env)))
        yield Run(work, env, outputs, log)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)


def layout_refs(layout: Path) -> dict[str, str]:
    """Tag -> manifest digest of an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    return {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in index["manifests"]
    }


def test_tags_select_releases_of_the_internal_package(page_run: Run) -> None:
    refs = layout_refs(page_run.work / "acme-greeter")
    assert len({refs["v1"], refs["v2"], refs["latest"]}) == 3
    for tag, version in [("v1", "1.0"), ("v2", "2.0"), ("latest", "2.1")]:
        bundle = page_run.work / f"bundle-{tag}"
        rootfs = umoci_unpack(page_run.work / "acme-greeter", bundle, tag)
        # The internal package runs the overridden public one.
        output = bwrap_run(rootfs, "acme-greeter")
        assert output.splitlines() == [f"acme-greeter {version}", "Hello from ACME!"]
        names = {p.name.split("-", 1)[1] for p in (rootfs / "nix" / "store").iterdir()}
        assert {"acme-greeter", "hello", "hello-2.10"} <= names


def test_tags_keep_their_image_when_the_branch_moves(page_run: Run) -> None:
    # `latest` moved to 2.1 after v2 was pulled; v2 is still the same image.
    reply = call(
        page_run.host,
        "GET",
        "/v2/acme-greeter/manifests/v2",
        {"Accept": OCI, **page_run.creds("alice")},
    )
    assert reply.status == 200
    assert (
        reply.header("Docker-Content-Digest") == layout_refs(page_run.work / "acme-greeter")["v2"]
    )


def test_ci_pulls_the_same_image_with_a_token(page_run: Run) -> None:
    ci = layout_refs(page_run.work / "ci-acme-greeter")
    assert ci["v2"] == layout_refs(page_run.work / "acme-greeter")["v2"]


def test_auth_is_on(page_run: Run) -> None:
    anonymous = call(page_run.host, "GET", "/v2/acme-greeter/manifests/v1", {"Accept": OCI})
    assert anonymous.status == 401
    assert anonymous.require_header("WWW-Authenticate").startswith("Bearer ")
    wrong = {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}
    assert call(page_run.host, "GET", "/v2/acme-greeter/manifests/v1", wrong).status == 401
    assert call(page_run.host, "GET", "/builds").status == 401


def test_a_build_failure_reaches_the_client_and_the_web_page(page_run: Run) -> None:
    [error] = json.loads(page_run.output_of("/manifests/next"))["errors"]
    assert error["code"] == "UNKNOWN"
    assert error["message"].startswith("image build failed")
    assert "syntax error" in error["detail"]["log"]

    failure = json.loads(page_run.output_of("/builds.json"))
    assert (failure["image"], failure["tag"]) == ("acme-greeter", "next")
    assert "syntax error" in failure["log"]

    html = call(page_run.host, "GET", "/builds", page_run.creds("alice"))
    assert html.status == 200
    text = html.body.decode()
    assert "acme-greeter:next" in text
    assert "syntax error" in text


def test_nixos_configuration_uses_real_options(tmp_path: Path) -> None:
    [block] = page_blocks("nix")
    expr = tmp_path / "configuration.nix"
    expr.write_text(block)
    evaluated = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", str(expr)],
        capture_output=True,
        text=True,
        check=True,
    )
    nixery = json.loads(evaluated.stdout)["services"]["nixery"]
    module = MODULE.read_text()
    declared = set(re.findall(r"^    (\w+) = mk\w*Option", module, re.MULTILINE))
    assert set(nixery) <= declared, set(nixery) - declared
    # What the module renders into the configuration file, checked by the CLI.
    rendered = {
        "host": nixery["listenAddress"],
        "port": nixery["port"],
        "pkgs-repo": nixery["pkgsRepo"],
        **nixery["settings"],
    }
    toml = "".join(f"{key} = {json.dumps(value)}\n" for key, value in rendered.items())
    assert tomllib.loads(toml) == rendered
    config = tmp_path / "nixery.toml"
    config.write_text(toml)
    check = subprocess.run(
        [sys.executable, "-m", "nixery", "check-config", "--syntax-only", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
