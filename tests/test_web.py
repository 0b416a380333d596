"""The pages, in a real headless Chromium, against the real server.

Screenshots land in tests/artifacts/ (or $NIXERY_TEST_ARTIFACTS).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import Server, StartServer, require
from tests.gated import WAITING, GatedPackage
from tests.http import Reply, call

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(os.environ.get("NIXERY_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
CHROMIUM = "/usr/bin/chromium"
# No sandbox (root in a VM), and nothing that reaches out to the network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
OCI = "application/vnd.oci.image.manifest.v1+json"
SBOM_TYPES = ("application/spdx+json", "application/vnd.cyclonedx+json")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require("chromium")
    # Imported here: the unit tests are collected where Playwright is absent.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Watch:
    """Everything a page reports that a person would call broken."""

    def __init__(self, page: Any, origin: str) -> None:
        self.problems: list[str] = []
        self.foreign: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("requestfailed", self._failed)
        page.on("request", lambda r: self._request(r.url, origin))

    def _console(self, message: Any) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text}")

    def _failed(self, request: Any) -> None:
        # The icon is fetched after the load event, so moving on to the next page
        # may cancel it (ERR_ABORTED); that it is served is checked on its own.
        cancelled = request.failure == "net::ERR_ABORTED"
        if not (cancelled and request.url.endswith("/static/favicon.svg")):
            self.problems.append(f"failed: {request.url} ({request.failure})")

    def _request(self, url: str, origin: str) -> None:
        if urlsplit(url).netloc != origin and not url.startswith("data:"):
            self.foreign.append(url)


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_for_running(server: Server, image: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = call(server.host, "GET", "/builds.json").json()
        assert not body["failures"], body["failures"]
        if any(b["image"] == image and WAITING in b["log"] for b in body["running"]):
            return
        time.sleep(0.1)
    raise AssertionError("the gated build never started")


def test_pages_in_a_browser(start_server: StartServer, gated: GatedPackage, browser: Any) -> None:
    server = start_server("--overlay", str(gated.overlay), "--nix-timeout", "120")
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    watch = Watch(page, server.host)

    # The front page: what this is and how to pull from this very host.
    page.goto(server.url + "/")
    assert page.title() == f"Nixery · Nixery at {server.host}"
    commands = page.locator("pre.cmd").all_inner_texts()
    assert any(c.startswith(f"docker run -ti {server.host}/shell/git/curl") for c in commands)
    assert any(c.startswith("podman run") for c in commands)
    assert any(c.startswith("nerdctl run") for c in commands)
    assert "bashInteractive, coreutils" in page.inner_text("main")
    assert "tests/fixtures/pkgs" in page.inner_text("code.rev")
    assert page.locator("button.copy").count() == len(commands)  # the script ran
    shot(page, "front-empty")

    # Look up a package that exists, through the form.
    page.fill("#package", "hello")
    page.click("form.lookup button")
    page.wait_for_url("**/packages/hello")
    main = page.inner_text("main")
    assert "In the package set." in main and "2.10" in main
    assert "Program that prints a friendly greeting" in main
    assert f"docker pull {server.host}/hello" in main
    shot(page, "package-found")

    # And one that does not: a suggestion leads to the right one.
    page.fill("#package", "helo")
    page.click("form.lookup button")
    page.wait_for_url("**/packages/helo")
    assert "Not in the package set." in page.inner_text("main")
    shot(page, "package-missing")
    page.click("ul.suggestions a")
    page.wait_for_url("**/packages/hello")
    assert "In the package set." in page.inner_text("main")

    # A build in progress shows what Nix is doing.
    image = f"shell/{gated.name}"
    replies: list[Reply] = []
    pull = threading.Thread(
        target=lambda: replies.append(
            call(server.host, "GET", f"/v2/{image}/manifests/latest", {"Accept": OCI})
        )
    )
    pull.start()
    wait_for_running(server, image)
    page.goto(server.url + "/")
    running = page.inner_text("article.running")
    assert image in running and WAITING in running and "building" in running.lower()
    shot(page, "front-building")
    gated.open()
    pull.join(120)
    assert replies and replies[0].status == 200

    # The finished build is listed and links to its image page.
    page.goto(server.url + "/")
    row = page.locator("table.builds tbody tr").first
    assert image in row.inner_text()
    row.locator("a").click()
    page.wait_for_url("**/images/*")
    layers = len(replies[0].json()["layers"])
    assert page.locator("svg.layers rect").count() == layers
    labels = page.locator("svg.layers text").all_text_contents()
    assert any(f"{gated.name}-1.0" in label for label in labels)
    assert any("glibc-2.36" in label for label in labels)
    packages = page.locator("ul.packages").inner_text()
    assert gated.name in packages and "bashInteractive" in packages
    assert f"docker pull {server.host}/{image}:latest" in page.inner_text("main")
    shot(page, "image")

    # On a phone: nothing wider than the screen.
    page.set_viewport_size({"width": 375, "height": 800})
    page.reload()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    shot(page, "image-phone")
    page.goto(server.url + "/")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    shot(page, "front-phone")

    assert watch.problems == []
    assert watch.foreign == []


def test_lookup_works_without_javascript(server: Server, browser: Any) -> None:
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    watch = Watch(page, server.host)
    page.goto(server.url + "/")
    assert page.locator("button.copy").count() == 0
    page.fill("#package", "haskellpackages.pandoc")
    page.click("form.lookup button")
    page.wait_for_url("**/packages/haskellpackages.pandoc")
    assert "haskellPackages.pandoc" in page.inner_text("h1")
    assert f"{server.host}/haskellpackages.pandoc" in page.inner_text("main")
    page.goto(server.url + "/packages/shell")
    assert "bashInteractive" in page.inner_text("main")
    assert watch.problems == []
    context.close()


def test_bad_input_gets_a_page_not_a_crash(server: Server) -> None:
    bad = call(server.host, "GET", "/?package=%3Cscript%3E")
    assert bad.status == 400 and b"<script>" not in bad.body
    assert call(server.host, "GET", "/images/" + "0" * 64).status == 404
    assert call(server.host, "GET", "/images/..%2F..%2Fetc").status == 404
    assert call(server.host, "GET", "/static/../app.py").status in (403, 404)
    css = call(server.host, "GET", "/static/style.css")
    assert css.status == 200 and css.require_header("Content-Type").startswith("text/css")
    icon = call(server.host, "GET", "/static/favicon.svg")
    assert icon.status == 200 and icon.require_header("Content-Type") == "image/svg+xml"
    assert icon.body.startswith(b"<svg")
    page = call(server.host, "GET", "/")
    assert "script-src 'self'" in page.require_header("Content-Security-Policy")


def test_image_page_links_the_sboms_the_registry_serves(server: Server, browser: Any) -> None:
    reply = call(server.host, "GET", "/v2/hello/manifests/latest", {"Accept": OCI})
    assert reply.status == 200, reply.body
    [key] = [p.stem for p in server.storage.glob("documents/images/*.json")]
    page = browser.new_page()
    watch = Watch(page, server.host)
    page.goto(server.url + "/")
    front = page.inner_text("main")
    assert "Software bills of materials" in front and "SPDX 2.3" in front
    assert f"oras discover {server.host}/shell/git/curl:latest" in front

    page.goto(f"{server.url}/images/{key}")
    links = page.locator("ul.sboms a")
    assert sorted(links.all_inner_texts()) == sorted(["sbom.spdx.json", "sbom.cdx.json"] * 2)
    linked = set()
    for href in [links.nth(i).get_attribute("href") or "" for i in range(links.count())]:
        fetched = page.request.get(server.url + href)
        digest = href.rsplit("/", 1)[-1]
        assert fetched.status == 200
        assert fetched.headers["content-type"] in SBOM_TYPES
        assert "sha256:" + hashlib.sha256(fetched.body()).hexdigest() == digest
        linked.add(digest)
    # The very files the referrers of both manifests name.
    served = set()
    record = json.loads((server.storage / "documents" / "images" / f"{key}.json").read_bytes())
    for manifest in record["manifests"].values():
        index = call(server.host, "GET", f"/v2/hello/referrers/{manifest['digest']}").json()
        for entry in index["manifests"]:
            artifact = call(server.host, "GET", f"/v2/hello/manifests/{entry['digest']}")
            served |= {layer["digest"] for layer in artifact.json()["layers"]}
    assert linked == served and len(linked) == 4
    other = record["manifests"]["OCI"]["digest"]  # a blob, but not one of its SBOMs
    assert call(server.host, "GET", f"/images/{key}/sbom/{other}").status == 404
    assert watch.problems == []
    page.close()
