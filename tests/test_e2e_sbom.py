"""Bills of materials through real clients: skopeo and oras-py find them by
the referrers tag and download them; they are schema-valid and list the
image's closure, each store path once."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from nixery.assembly.manifest import OCI_INDEX, OCI_MANIFEST
from nixery.assembly.sbom import CYCLONEDX_JSON, SPDX_JSON
from tests.clients import skopeo_inspect
from tests.conftest import Server, StartServer, require
from tests.http import call

pytestmark = pytest.mark.e2e

IMAGE = "shell/hello"


@pytest.fixture(scope="module")
def registry(start_module_server: StartServer) -> Iterator[Server]:
    yield start_module_server()


@pytest.fixture(scope="module")
def image(registry: Server) -> tuple[str, dict[str, Any]]:
    """The image's OCI manifest digest (skopeo pulls it, so it is built) and its record."""
    require("skopeo")
    raw = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
         f"docker://{registry.host}/{IMAGE}:latest"],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout.strip()  # fmt: skip
    [record] = [json.loads(p.read_bytes()) for p in registry.storage.glob("documents/images/*")]
    assert record["manifests"]["OCI"]["digest"] == raw
    return raw, record


def oras_client() -> Any:
    import oras.provider

    client = oras.provider.Registry(insecure=True)
    # oras retries every failed request for minutes; a failure must show at once.
    client.do_request = oras.provider.Registry.do_request.__wrapped__.__get__(client)
    return client


def closure_paths(record: dict[str, Any]) -> set[str]:
    """The store paths packed into the image, checked to be a whole closure."""
    paths = {p for layer in record["layers"] for p in layer["paths"]}
    requisites = subprocess.run(
        ["nix-store", "--query", "--requisites", *sorted(paths)],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert set(requisites) == paths
    return paths


def test_clients_find_and_download_the_sboms_by_the_referrers_tag(
    registry: Server, image: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    digest, record = image
    fallback = f"{IMAGE}:{digest.replace(':', '-')}"
    index = skopeo_inspect(registry.host, fallback, raw=True)
    assert index["mediaType"] == OCI_INDEX
    assert sorted(m["artifactType"] for m in index["manifests"]) == [SPDX_JSON, CYCLONEDX_JSON]
    # The referrers API answers with the same index.
    api = call(registry.host, "GET", f"/v2/{IMAGE}/referrers/{digest}")
    assert api.json() == index

    client = oras_client()
    listed = client.get_manifest(f"{registry.host}/{fallback}", [OCI_INDEX])
    assert listed == index
    files: dict[str, Path] = {}
    for entry in listed["manifests"]:
        artifact = client.get_manifest(f"{registry.host}/{IMAGE}@{entry['digest']}", [OCI_MANIFEST])
        assert artifact["subject"]["digest"] == digest
        outdir = tmp_path / entry["artifactType"].replace("/", "_")
        [saved] = client.pull(
            target=f"{registry.host}/{IMAGE}@{entry['digest']}", outdir=str(outdir)
        )
        files[entry["artifactType"]] = Path(saved)
    assert {p.name for p in files.values()} == {"sbom.spdx.json", "sbom.cdx.json"}

    closure = closure_paths(record)
    spdx = parse_file(str(files[SPDX_JSON]))
    assert validate_full_spdx_document(spdx, "SPDX-2.3") == []
    packages = json.loads(files[SPDX_JSON].read_bytes())["packages"]
    listed_paths = Counter(p["packageFileName"] for p in packages if "packageFileName" in p)
    assert listed_paths == Counter(dict.fromkeys(closure, 1))
    hello = next(p for p in packages if p["name"] == "hello")
    assert hello["licenseDeclared"] == "GPL-3.0-or-later"
    assert hello["homepage"] == "https://www.gnu.org/software/hello/manual/"
    assert all(len(p["checksums"][0]["checksumValue"]) == 64 for p in packages)

    cyclonedx = files[CYCLONEDX_JSON].read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(cyclonedx) is None
    components = json.loads(cyclonedx)["components"]
    assert Counter(c["bom-ref"] for c in components) == Counter(dict.fromkeys(closure, 1))


def test_sboms_are_reproducible_across_a_fresh_build(
    registry: Server, image: tuple[str, dict[str, Any]], start_server: StartServer
) -> None:
    """A second registry with its own storage builds the image again: the
    same manifest gets the same SBOM digests."""
    digest, record = image
    fresh = start_server()
    reply = call(fresh.host, "GET", f"/v2/{IMAGE}/manifests/latest", {"Accept": OCI_MANIFEST})
    assert reply.header("Docker-Content-Digest") == digest
    first = call(registry.host, "GET", f"/v2/{IMAGE}/referrers/{digest}")
    again = call(fresh.host, "GET", f"/v2/{IMAGE}/referrers/{digest}")
    assert again.body == first.body and json.loads(first.body)["manifests"]


def test_missing_referrers_tag_is_manifest_unknown(registry: Server) -> None:
    reply = call(registry.host, "GET", f"/v2/{IMAGE}/manifests/sha256-{'0' * 64}")
    assert reply.status == 404 and reply.error_codes() == ["MANIFEST_UNKNOWN"]


def test_build_profile_reports_the_cost_of_the_sboms(
    registry: Server, image: tuple[str, dict[str, Any]]
) -> None:
    [record] = call(registry.host, "GET", "/builds.json").json()["builds"]
    profile = record["profile"]
    # Metadata for every output of the build graph, so at least the closure's.
    assert profile["metadata_entries"] >= len(closure_paths(image[1]))
    assert 0 < profile["sbom"] <= profile["documents"] <= profile["total"]


def test_an_image_stored_without_sboms_gets_them_on_its_next_pull(
    registry: Server, image: tuple[str, dict[str, Any]]
) -> None:
    """An image stored before SBOMs existed is built again (its layers are
    reused) rather than served without them."""
    digest, record = image
    [document] = list(registry.storage.glob("documents/images/*"))
    older = {k: v for k, v in record.items() if k != "referrers"}
    document.write_text(json.dumps(older))
    for stored in registry.storage.glob("documents/referrers/*"):
        stored.unlink()
    assert call(registry.host, "GET", f"/v2/{IMAGE}/referrers/{digest}").json()["manifests"] == []

    reply = call(registry.host, "GET", f"/v2/{IMAGE}/manifests/latest", {"Accept": OCI_MANIFEST})
    assert reply.status == 200 and reply.header("Docker-Content-Digest") == digest
    builds = call(registry.host, "GET", "/builds.json").json()["builds"]
    assert len(builds) == 2 and sorted(b["packed"] for b in builds)[0] == 0
    assert json.loads(document.read_bytes())["referrers"] == record["referrers"]
    listed = call(registry.host, "GET", f"/v2/{IMAGE}/referrers/{digest}").json()["manifests"]
    assert len(listed) == 2


def console_example(page: Path) -> list[tuple[str, list[str]]]:
    """The `console` block of a page: each `$ ` command with the lines it prints."""
    text = page.read_text()
    block = text.split("```console\n", 1)[1].split("```\n", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def shape(output: str) -> Any:
    """JSON with digests and sizes blanked: they depend on the package set."""
    blanked = re.sub(r"sha256:[0-9a-f]{64}", "sha256:-", output)
    return json.loads(re.sub(r'"size":\d+', '"size":0', blanked))


def test_the_example_runs_as_written(registry: Server, image: object, tmp_path: Path) -> None:
    require("skopeo", "curl", "jq")
    steps = console_example(Path(__file__).parent.parent / "docs" / "sbom.md")
    assert len(steps) >= 5
    script = ["set -euo pipefail"]
    for number, (command, _) in enumerate(steps):
        # A separator on a line of its own: curl prints no newline at the end.
        script += [f"printf '\\n>>> {number}\\n'", command.replace("127.0.0.1:8080", registry.host)]
    run = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=tmp_path, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    printed = re.split(r"^>>> \d+\n", run.stdout, flags=re.MULTILINE)[1:]
    assert len(printed) == len(steps)
    for (command, expected), output in zip(steps, printed, strict=True):
        assert [shape(line) for line in output.splitlines() if line] == [
            shape(line) for line in expected
        ], command
    document = json.loads((tmp_path / "sbom.spdx.json").read_text())
    assert document["spdxVersion"] == "SPDX-2.3"
