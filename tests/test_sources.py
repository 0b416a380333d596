"""Package sources against real git, real Nix and a local channel server.

The service runs in-process so that every subprocess it starts can be
counted: a pull served from cache must not start Nix at all.
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nixery.assembly.manifest import negotiate
from nixery.errors import BuildFailed, ErrorCode, RegistryError
from nixery.images.model import BuildSettings
from nixery.images.service import ImageService
from nixery.packages import process
from nixery.packages.names import parse_image_name
from nixery.packages.nix import FLAKES, Nix
from nixery.packages.sources import Sources, source_config
from nixery.storage import FilesystemStorage
from tests.sourcefixtures import (
    FLAKE,
    Channels,
    PkgsRepo,
    channel_server,
    copy_package_set,
    make_pkgs_repo,
    set_hello_version,
    tarball,
)

NIX_COMMANDS = {"nix", "nix-instantiate", "nix-store", "nix-prefetch-url", "nix-build"}
OCI = negotiate(["application/vnd.oci.image.manifest.v1+json"])

ADD_OVERLAY = """final: prev: {
  greeting = derivation {
    name = "greeting-1.0";
    system = prev.hello.system;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "/bin/busybox mkdir -p $out/bin && echo 'echo hi' > $out/bin/greeting" ];
  };
}
"""

# Overrides `hello`; its script names a package of the other overlay via `final`.
OVERRIDE_OVERLAY = """final: prev: {
  hello = derivation {
    name = "hello-9.9";
    system = prev.hello.system;
    builder = "/bin/busybox";
    script = "echo ${final.greeting.name}";
    args = [ "sh" "-c" "/bin/busybox mkdir -p $out/bin && echo $script > $out/bin/hello" ];
  };
}
"""


class Clock:
    """A settable clock for resolution TTLs."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Commands:
    """Every subprocess the service starts, recorded on the way to the real one."""

    argvs: list[list[str]] = field(default_factory=list)

    def nix(self) -> int:
        return sum(1 for a in self.argvs if a[0] in NIX_COMMANDS)

    def git(self) -> int:
        return sum(1 for a in self.argvs if a[0] == "git")


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> Commands:
    recorded = Commands()
    real_run = process.run
    lock = threading.Lock()

    def run(argv: list[str], **kwargs: Any) -> process.Completed:
        with lock:
            recorded.argvs.append(list(argv))
        return real_run(argv, **kwargs)

    monkeypatch.setattr(process, "run", run)
    return recorded


@dataclass
class Registry:
    service: ImageService
    sources: Sources
    commands: Commands

    def digest(self, name: str, tag: str = "latest") -> str:
        return self.service.manifest(name, tag, OCI).digest

    def store_paths(self, name: str, tag: str = "latest") -> list[str]:
        """The store paths in the image's layers."""
        source = self.sources.resolve(tag)
        platform = self.service.settings.platforms[0]
        image = self.service.image(parse_image_name(name), source, platform)
        return [p for layer in image.layers for p in layer.paths]

    def version_of(self, package: str, name: str, tag: str = "latest") -> str:
        names = [p.split("-", 1)[1] for p in self.store_paths(name, tag)]
        [found] = [n.removeprefix(package + "-") for n in names if n.startswith(package + "-")]
        return found

    def unknown(self, name: str, tag: str) -> RegistryError:
        with pytest.raises(RegistryError) as err:
            self.service.manifest(name, tag, OCI)
        assert err.value.code is ErrorCode.MANIFEST_UNKNOWN
        return err.value


MakeRegistry = Callable[..., Registry]


@pytest.fixture
def make_registry(tmp_path: Path, commands: Commands) -> Iterator[MakeRegistry]:
    def make(
        *,
        storage: Path | None = None,
        clock: Clock | None = None,
        overlays: tuple[str, ...] = (),
        cache: Path | None = None,
        **source: Any,
    ) -> Registry:
        kinds = ("path", "channel", "repo", "flake")
        options = {k: v for k, v in source.items() if k not in kinds}
        config = source_config(
            source.get("path"),
            source.get("channel"),
            source.get("repo"),
            source.get("flake"),
            cache_dir=str(cache or tmp_path / "source-cache"),
            **options,
        )
        nix = Nix(timeout=120)
        sources = Sources(config, nix, overlays, 120, clock or Clock())
        storage_dir = storage or tmp_path / f"storage-{len(list(tmp_path.glob('storage-*')))}"
        service = ImageService(
            FilesystemStorage(str(storage_dir)), nix, sources, BuildSettings(overlays=overlays)
        )
        return Registry(service, sources, commands)

    yield make


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> PkgsRepo:
    return make_pkgs_repo(tmp_path_factory.mktemp("repo") / "pkgs")


# -- git repositories ----------------------------------------------------------


@pytest.mark.nix
def test_git_tags_select_versions(make_registry: MakeRegistry, tmp_path: Path) -> None:
    repo = make_pkgs_repo(tmp_path / "pkgs")
    clock = Clock()
    reg = make_registry(repo=repo.url, clock=clock)
    commands = reg.commands

    v1, v2 = reg.digest("hello", "v1"), reg.digest("hello", "v2")
    assert v1 != v2
    assert reg.version_of("hello", "hello", "v1") == "2.10"
    assert reg.version_of("hello", "hello", "v2") == "2.11"
    # The default branch, another branch and a commit name the same images.
    assert reg.digest("hello", "latest") == v2
    assert reg.digest("hello", "stable") == v1
    assert reg.digest("hello", repo.commits["v1"]) == v1
    assert reg.sources.tags() == ["latest", "main", "stable", "v1", "v2"]

    # Served from cache: no Nix, and (within the TTL) no git either.
    before = len(commands.argvs)
    for tag in ("v1", "v2", "latest", "stable", repo.commits["v2"]):
        reg.digest("hello", tag)
    assert commands.argvs[before:] == []

    # Unknown tags: 404 without building.
    before_nix = commands.nix()
    assert reg.unknown("hello", "v3").detail["tag"] == "v3"
    reg.unknown("hello", "0" * 40)  # a commit the repository does not have
    assert commands.nix() == before_nix

    # The default branch moves: seen once the TTL has passed, not before.
    v3 = repo.commit_version("3.0", "hello 3.0")
    assert reg.digest("hello", "latest") == v2
    clock.advance(601)
    latest = reg.digest("hello", "latest")
    assert latest not in (v1, v2)
    assert reg.version_of("hello", "hello") == "3.0"
    assert reg.digest("hello", v3) == latest


@pytest.mark.nix
def test_tags_resolving_to_one_revision_build_once(
    make_registry: MakeRegistry, repo: PkgsRepo
) -> None:
    reg = make_registry(repo=repo.url)
    tags = ["v1", "stable", repo.commits["v1"]] * 2
    barrier = threading.Barrier(len(tags))
    digests: list[str] = []

    def pull(tag: str) -> None:
        barrier.wait()
        digests.append(reg.digest("hello/curl", tag))

    threads = [threading.Thread(target=pull, args=(tag,)) for tag in tags]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(digests) == len(tags) and len(set(digests)) == 1
    evaluations = [a for a in reg.commands.argvs if a[0] == "nix-instantiate"]
    assert len(evaluations) == 1
    # One listing of the remote's refs for all of them.
    assert sum(1 for a in reg.commands.argvs if "ls-remote" in a) == 1


def test_git_refuses_unsafe_urls() -> None:
    with pytest.raises(Exception, match="invalid git source"):
        source_config(None, None, "--upload-pack=touch /tmp/x")


# -- channels --------------------------------------------------------------------


@pytest.fixture
def channels(tmp_path: Path) -> Iterator[Channels]:
    old = copy_package_set(tmp_path / "old", "2.10")
    new = copy_package_set(tmp_path / "new", "2.12")
    with channel_server() as server:
        for pkgs in (old, new):
            commit = hashlib.sha1(pkgs.name.encode()).hexdigest()
            server.tarballs[commit] = tarball(pkgs, f"nixpkgs-{commit}")
        server.revisions["nixos-test"] = _commit("old")
        yield server


def _commit(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


@pytest.mark.nix
def test_channel_is_resolved_cached_and_followed(
    make_registry: MakeRegistry, channels: Channels
) -> None:
    clock = Clock()
    urls = {"channel_url": channels.tarball_url, "revision_url": channels.revision_url}
    reg = make_registry(channel="nixos-test", clock=clock, **urls)

    first = reg.digest("hello")
    assert reg.version_of("hello", "hello") == "2.10"
    assert channels.count("/git-revision") == 1
    assert channels.count(".tar.gz") == 1

    # Within the TTL: no new resolution, and a cached image starts no Nix.
    nix = reg.commands.nix()
    assert reg.digest("hello") == first
    assert reg.commands.nix() == nix
    assert channels.count("/git-revision") == 1
    # A new image from the same commit reuses the fetched tarball.
    reg.digest("hello/jq")
    assert channels.count(".tar.gz") == 1

    # The channel moves on; seen after the TTL.
    channels.revisions["nixos-test"] = _commit("new")
    assert reg.digest("hello") == first
    clock.advance(601)
    second = reg.digest("hello")
    assert second != first
    assert reg.version_of("hello", "hello") == "2.12"
    assert channels.count("/git-revision") == 2

    # An unreachable channel server keeps the last answer.
    channels.broken = True
    clock.advance(601)
    nix = reg.commands.nix()
    assert reg.digest("hello") == second
    assert reg.commands.nix() == nix

    # Other tags are unknown unless tag versions are allowed; nothing is fetched.
    channels.broken = False
    requests = len(channels.requests)
    for tag in ("nixos-test", _commit("old"), "v1"):
        reg.unknown("hello", tag)
    assert len(channels.requests) == requests
    assert reg.commands.nix() == nix


@pytest.mark.nix
def test_channel_tag_versions(make_registry: MakeRegistry, channels: Channels) -> None:
    urls = {"channel_url": channels.tarball_url, "revision_url": channels.revision_url}
    reg = make_registry(channel="nixos-test", allow_tag_versions=True, **urls)
    channels.revisions["nixos-other"] = _commit("new")

    assert reg.version_of("hello", "hello", _commit("old")) == "2.10"
    assert reg.version_of("hello", "hello", "nixos-other") == "2.12"
    assert reg.digest("hello", "nixos-other") == reg.digest("hello", _commit("new"))

    nix = reg.commands.nix()
    requests = len(channels.requests)
    reg.unknown("hello", "v1")  # neither a channel name nor a commit: not even looked up
    assert len(channels.requests) == requests
    reg.unknown("hello", "nixos-missing")  # the channel server has no such channel
    assert reg.commands.nix() == nix
    reg.unknown("hello", "f" * 40)  # no tarball for that commit: 404 after trying to fetch it


@pytest.mark.nix
def test_fetched_channel_survives_a_restart(
    make_registry: MakeRegistry, channels: Channels, tmp_path: Path
) -> None:
    urls = {"channel_url": channels.tarball_url, "revision_url": channels.revision_url}
    storage = tmp_path / "storage"
    first = make_registry(channel=_commit("old"), storage=storage, **urls)
    digest = first.digest("hello")
    assert channels.count(".tar.gz") == 1
    # A new process: cached image without Nix, new images from the rooted store path.
    again = make_registry(channel=_commit("old"), storage=storage, **urls)
    nix = again.commands.nix()
    assert again.digest("hello") == digest
    assert again.commands.nix() == nix
    again.digest("hello/jq")
    assert channels.count(".tar.gz") == 1
    assert channels.count("/git-revision") == 0  # a commit needs no resolving


# -- local paths and overlays ----------------------------------------------------


@pytest.mark.nix
def test_mutable_path_is_fingerprinted(make_registry: MakeRegistry, tmp_path: Path) -> None:
    pkgs = copy_package_set(tmp_path / "pkgs")
    reg = make_registry(path=str(pkgs), ttl=0)
    first = reg.digest("hello")
    nix = reg.commands.nix()
    assert nix > 0

    # Unchanged: served from cache without starting Nix.
    assert reg.digest("hello") == first
    assert reg.commands.nix() == nix

    # A package changes: a new image on the next pull.
    set_hello_version(pkgs, "2.13")
    changed = reg.digest("hello")
    assert changed != first
    assert reg.version_of("hello", "hello") == "2.13"

    # Back to the first content: the first image again, from cache.
    set_hello_version(pkgs, "2.10")
    nix = reg.commands.nix()
    assert reg.digest("hello") == first
    assert reg.commands.nix() == nix
    reg.unknown("hello", "v1")


@pytest.mark.nix
def test_overlays_add_and_override(make_registry: MakeRegistry, tmp_path: Path) -> None:
    add = tmp_path / "add.nix"
    add.write_text(ADD_OVERLAY)
    override = tmp_path / "override.nix"
    override.write_text(OVERRIDE_OVERLAY)
    plain = make_registry(path=str(copy_package_set(tmp_path / "pkgs")))
    reg = make_registry(path=plain.sources.config.value, overlays=(str(add), str(override)), ttl=0)

    assert reg.version_of("greeting", "greeting/hello") == "1.0"
    assert reg.version_of("hello", "greeting/hello") == "9.9"
    assert plain.version_of("hello", "hello") == "2.10"
    plain.unknown("greeting", "latest")

    # The overlays' content is part of the key: an edit gives a new image.
    before = reg.digest("hello")
    override.write_text(OVERRIDE_OVERLAY.replace("9.9", "9.10"))
    assert reg.digest("hello") != before
    assert reg.version_of("hello", "hello") == "9.10"


# -- flakes ------------------------------------------------------------------------


@pytest.mark.nix
def test_flake_from_a_path(make_registry: MakeRegistry, repo: PkgsRepo, tmp_path: Path) -> None:
    add = tmp_path / "add.nix"
    add.write_text(ADD_OVERLAY)
    reg = make_registry(flake=f"path:{repo.path}", overlays=(str(add),))
    assert reg.version_of("hello", "hello") == "2.11"
    # The flake's set is not a function: the overlay is applied on top of it.
    assert reg.version_of("greeting", "greeting") == "1.0"
    reg.unknown("hello", "v1")  # a path has no versions

    nix = reg.commands.nix()
    reg.digest("hello")
    assert reg.commands.nix() == nix


@pytest.mark.nix
def test_flake_git_tags(make_registry: MakeRegistry, repo: PkgsRepo) -> None:
    reg = make_registry(flake=f"git+{repo.url}")
    assert reg.version_of("hello", "hello", "v1") == "2.10"
    assert reg.version_of("hello", "hello", "latest") == "2.11"
    assert reg.digest("hello", "stable") == reg.digest("hello", "v1")
    # Another tag of the same commit is served from the first one's image.
    evaluations = sum(1 for a in reg.commands.argvs if a[0] == "nix-instantiate")
    assert reg.digest("hello", repo.commits["v1"]) == reg.digest("hello", "v1")
    assert sum(1 for a in reg.commands.argvs if a[0] == "nix-instantiate") == evaluations
    nix = reg.commands.nix()
    reg.unknown("hello", "v9")
    assert reg.commands.nix() == nix


WRAPPER_FLAKE = """{
  inputs.pkgs.url = "INPUT";
  outputs = { self, pkgs }: { legacyPackages = pkgs.legacyPackages; };
}
"""


@pytest.mark.nix
def test_flake_inputs_need_a_lock_file(make_registry: MakeRegistry, tmp_path: Path) -> None:
    pkgs = copy_package_set(tmp_path / "pkgs")
    (pkgs / "flake.nix").write_text(FLAKE)
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    (wrapper / "flake.nix").write_text(WRAPPER_FLAKE.replace("INPUT", f"path:{pkgs}"))
    clock = Clock()
    reg = make_registry(flake=f"path:{wrapper}", clock=clock)

    # Without flake.lock the input is not pinned: an error, and no lock file is written.
    with pytest.raises(BuildFailed):
        reg.digest("hello")
    assert not (wrapper / "flake.lock").exists()

    subprocess.run(
        ["nix", *FLAKES, "flake", "lock", f"path:{wrapper}"], check=True, capture_output=True
    )
    clock.advance(601)
    assert reg.version_of("hello", "hello") == "2.10"
