"""The Kubernetes manifests under deploy/kubernetes, checked offline: they
parse, hang together, and configure a Nixery that accepts the configuration."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from nixery.cli import serve
from nixery.config import Settings
from nixery.packages import process

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
VARIANTS = ["single", "scaled"]
EVAL_IMAGE = ROOT / "tests" / "nixos" / "eval-image.nix"
SDK_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "NIX_CONFIG"}


def documents(variant: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted((DEPLOY / variant).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path.name, doc


def objects(variant: str) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for _, doc in documents(variant):
        if doc["kind"] != "Kustomization":
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def one(variant: str, kind: str) -> dict[str, Any]:
    [doc] = [d for (k, _), d in objects(variant).items() if k == kind]
    return doc


def container(variant: str) -> dict[str, Any]:
    [c] = one(variant, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def pod_labels(variant: str) -> dict[str, str]:
    labels: dict[str, str] = one(variant, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def serve_variables() -> set[str]:
    names: set[str] = set()
    for param in serve.params:
        if isinstance(param, click.Option) and param.envvar:
            envvar = param.envvar
            names.update([envvar] if isinstance(envvar, str) else envvar)
    return names


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_document_is_a_named_object_listed_in_the_kustomization(variant: str) -> None:
    files = {p.name for p in (DEPLOY / variant).glob("*.yaml")}
    [kustomization] = [d for _, d in documents(variant) if d["kind"] == "Kustomization"]
    assert set(kustomization["resources"]) == files - {"kustomization.yaml"}
    for name, doc in documents(variant):
        assert doc["apiVersion"] and doc["kind"], name
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], name


@pytest.mark.parametrize("variant", VARIANTS)
def test_deployment_service_and_probes_agree(variant: str) -> None:
    deployment = one(variant, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = one(variant, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()

    c = container(variant)
    assert c["image"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports.keys()
    config = one(variant, "ConfigMap")["data"]
    assert ports["http"] == int(config.get("NIXERY_PORT", 8080))
    for probe, path in (("readinessProbe", "/healthz"), ("livenessProbe", "/livez")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ports
    requests = c["resources"]["requests"]
    assert {"cpu", "memory"} <= requests.keys()
    # Room for a build in progress to finish after SIGTERM: a few Nix steps.
    grace = one(variant, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 3 * float(config.get("NIX_TIMEOUT", 60))


@pytest.mark.parametrize("variant", VARIANTS)
def test_environment_references_exist_and_nixery_accepts_it(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = objects(variant)
    known = serve_variables() | SDK_VARIABLES
    env: dict[str, str] = {}
    for source in container(variant)["envFrom"]:
        if "configMapRef" in source:
            data = found[("ConfigMap", source["configMapRef"]["name"])]["data"]
        else:
            secret = found[("Secret", source["secretRef"]["name"])]
            data = secret.get("stringData") or secret["data"]
        assert set(data) <= known, f"unknown variables {set(data) - known}"
        env.update(data)
    for name in list(serve_variables()):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    settings = Settings.from_options(serve.make_context("serve", []).params)
    if variant == "scaled":
        assert settings.s3 is not None and settings.s3.bucket
    else:
        assert settings.s3 is None


def test_scaled_runs_several_replicas_on_s3() -> None:
    assert one("scaled", "Deployment")["spec"]["replicas"] >= 2
    assert one("scaled", "ConfigMap")["data"]["NIXERY_STORAGE_BACKEND"] == "s3"
    secret = one("scaled", "Secret")["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secret.keys()
    budget = one("scaled", "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] < one("scaled", "Deployment")["spec"]["replicas"]


def test_scaled_selectors_pick_the_deployments_pods() -> None:
    """A selector that matches nothing is valid YAML and silently does nothing."""
    labels = pod_labels("scaled").items()
    budget = one("scaled", "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels
    affinity = one("scaled", "Deployment")["spec"]["template"]["spec"]["affinity"]
    for term in affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]:
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels


def test_single_keeps_its_storage_on_a_volume() -> None:
    deployment = one("single", "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {m["mountPath"]: m["name"] for m in container("single")["volumeMounts"]}
    storage = one("single", "ConfigMap")["data"]["NIXERY_STORAGE_PATH"]
    assert ("PersistentVolumeClaim", claims[mounts[storage]]) in objects("single")


@pytest.mark.nix
def test_image_expression_parses() -> None:
    process.run(["nix-instantiate", "--parse", str(ROOT / "nix" / "pkgs" / "image.nix")])


@pytest.mark.nix
@pytest.mark.parametrize("variant", VARIANTS)
def test_image_runs_what_the_manifests_expect(variant: str) -> None:
    """nix/pkgs/image.nix, evaluated with stand-ins (tests/nixos/eval-image.nix)."""
    image = json.loads(
        process.run(["nix-instantiate", "--eval", "--strict", "--json", str(EVAL_IMAGE)]).stdout
    )
    config = image["config"]
    assert config["Entrypoint"][0].endswith("/bin/nixery") and config["Entrypoint"][1:] == ["serve"]
    c = container(variant)
    assert config["ExposedPorts"].keys() == {f"{p['containerPort']}/tcp" for p in c["ports"]}
    env = dict(line.split("=", 1) for line in config["Env"])
    assert {n for n in env if n.startswith("NIXERY_")} <= serve_variables()
    # The image's storage path is the one the single layout mounts its claim at.
    storage = one("single", "ConfigMap")["data"].get("NIXERY_STORAGE_PATH")
    assert storage in (None, env["NIXERY_STORAGE_PATH"])
    assert "var/cache/nixery" in image["extraCommands"].split()
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    if variant == "single":
        assert env["NIXERY_STORAGE_PATH"] in mounts
    # Nix runs single-user as root in the pod: no build users, no sandbox.
    [nix_conf] = [p["text"] for p in image["contents"] if isinstance(p, dict)]
    assert "build-users-group =\n" in nix_conf and "sandbox = false\n" in nix_conf
    assert "/tmp" in mounts
