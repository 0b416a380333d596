"""The parts of package sources that need neither Nix nor a server: git
listing and mirroring (real git), content fingerprints, configuration."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from nixery.errors import ConfigError
from nixery.packages import git
from nixery.packages.fingerprint import Fingerprinter
from nixery.packages.sources import Sources, source_config
from tests.sourcefixtures import PkgsRepo, make_pkgs_repo
from tests.sourcefixtures import git as run_git

LS_REMOTE = """\
{a}\tHEAD
{a}\trefs/heads/main
{b}\trefs/heads/v1
{c}\trefs/tags/v1
{b}\trefs/tags/v1^{{}}
{a}\trefs/tags/light
{a}\trefs/pull/1/head
not-a-commit\trefs/heads/junk
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> PkgsRepo:
    return make_pkgs_repo(tmp_path_factory.mktemp("repo") / "pkgs")


def test_parse_ls_remote_peels_tags_and_prefers_them() -> None:
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    refs = git.parse_ls_remote(LS_REMOTE.format(a=a, b=b, c=c))
    assert refs.head == a
    assert refs.lookup("v1") == ("refs/tags/v1", b)  # the commit, not the tag object
    assert refs.lookup("main") == ("refs/heads/main", a)
    assert refs.lookup("light") == ("refs/tags/light", a)
    assert refs.lookup("junk") is None and refs.lookup("pull/1/head") is None
    assert refs.names() == ["light", "main", "v1"]


def test_ls_remote_and_mirror_on_a_real_repository(repo: PkgsRepo, tmp_path: Path) -> None:
    refs = git.ls_remote(repo.url, timeout=30)
    assert refs.head == repo.commits["v2"]
    assert refs.lookup("v1") == ("refs/tags/v1", repo.commits["v1"])
    assert refs.lookup("stable") == ("refs/heads/stable", repo.commits["v1"])

    mirror = git.Mirror(repo.url, str(tmp_path / "mirror.git"), timeout=30)
    assert not mirror.has(repo.commits["v1"])
    assert mirror.ensure(repo.commits["v1"])
    assert not mirror.ensure("0" * 40)
    mirror.archive(repo.commits["v1"], str(tmp_path / "v1.tar"), "source")
    with tarfile.open(tmp_path / "v1.tar") as tar:
        names = tar.getnames()
        packages = tar.extractfile("source/packages.nix")
        assert packages is not None
        assert 'version = "2.10";' in packages.read().decode()
    assert "source/default.nix" in names and "source/flake.nix" in names


@pytest.mark.parametrize("value", ["-u", "--upload-pack=x", "a\nb", ""])
def test_git_refuses_option_like_arguments(value: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        git.check_argument(value, "ref")
    with pytest.raises(ValueError):
        git.Mirror(value, str(tmp_path / "m.git"), 10)


def test_fingerprint_follows_content(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.nix").write_text("{ a = 1; }")
    (tree / "link").symlink_to("sub/a.nix")
    fp = Fingerprinter()
    first = fp.digest(str(tree))
    assert fp.digest(str(tree)) == first

    # Same size and mtime: stat data this fresh is not trusted, the file is read again.
    a = tree / "sub" / "a.nix"
    os.utime(a, ns=(10**18, 10**18))
    before = fp.digest(str(tree))
    a.write_text("{ a = 2; }")
    os.utime(a, ns=(10**18, 10**18))
    assert fp.digest(str(tree)) not in (before, first)

    a.write_text("{ a = 1; }")
    assert fp.digest(str(tree)) == first
    a.chmod(0o755)
    assert fp.digest(str(tree)) != first
    a.chmod(0o644)
    (tree / "link").unlink()
    (tree / "link").symlink_to("elsewhere")
    assert fp.digest(str(tree)) != first
    (tree / "link").unlink()
    (tree / "link").symlink_to("sub/a.nix")
    # A git directory's churn is not content.
    (tree / ".git").mkdir()
    (tree / ".git" / "index").write_text("x")
    assert fp.digest(str(tree)) == first
    assert fp.digest(str(a)) != first


def test_source_config_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="only one"):
        source_config(str(tmp_path), "nixos-unstable", None)
    with pytest.raises(ConfigError, match="only one"):
        source_config(None, None, "https://example.org/pkgs.git", "github:org/pkgs")
    with pytest.raises(ConfigError, match="does not exist"):
        source_config(str(tmp_path / "missing"), None, None)
    with pytest.raises(ConfigError, match="invalid channel"):
        source_config(None, "../etc", None)
    with pytest.raises(ConfigError, match=r"\{rev\}"):
        source_config(None, "nixos-24.11", None, channel_url="https://mirror.example/x.tar.gz")
    with pytest.raises(ConfigError, match=r"\{channel\}"):
        source_config(None, "nixos-24.11", None, revision_url="https://example/rev")
    with pytest.raises(ConfigError, match="attribute path"):
        source_config(None, None, None, "github:org/pkgs#foo")
    with pytest.raises(ConfigError, match="invalid flake"):
        source_config(None, None, None, "--impure")
    with pytest.raises(ConfigError, match="negative"):
        source_config(None, "nixos-24.11", None, ttl=-1)

    default = source_config(None, None, None)
    assert (default.kind, default.value) == ("channel", "nixos-unstable")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "repo").mkdir()
    assert source_config(None, None, "repo").value == str(tmp_path / "repo")


def test_flake_refs_for_tags(repo: PkgsRepo) -> None:
    def ref(flake: str, tag: str) -> str | None:
        return Sources(source_config(None, None, None, flake))._flake_ref(tag)

    assert ref("github:org/pkgs", "v1") == "github:org/pkgs?ref=v1"
    assert ref("github:org/pkgs?dir=sub", "a" * 40) == f"github:org/pkgs?dir=sub&rev={'a' * 40}"
    assert ref("github:org/pkgs/main", "v1") is None  # already names a ref
    assert ref("git+https://example.org/pkgs?ref=main", "v1") is None
    assert ref("path:/srv/pkgs", "v1") is None
    # A git flake's tags are looked up, so Nix fetches them by their full name.
    assert ref(f"git+{repo.url}", "v1") == (
        f"git+{repo.url}?ref=refs%2Ftags%2Fv1&rev={repo.commits['v1']}"
    )
    flake = Sources(source_config(None, None, None, f"git+{repo.url}"))
    assert flake.tags() == ["latest", "main", "stable", "v1", "v2"]


def test_export_is_the_commits_content_whatever_its_gitattributes_say(tmp_path: Path) -> None:
    # `git archive` drops export-ignore files and expands export-subst
    # placeholders; Nix (and a checkout) would see the files as committed.
    work = tmp_path / "work"
    work.mkdir()
    (work / "default.nix").write_text("import ./packages.nix\n")
    (work / "packages.nix").write_text('{ rev = "$Format:%H$"; }\n')
    (work / ".gitattributes").write_text("packages.nix export-ignore export-subst\n")
    run_git(work, "init", "--quiet")
    run_git(work, "add", ".")
    run_git(work, "commit", "--quiet", "-m", "packages")
    commit = run_git(work, "rev-parse", "HEAD")
    mirror = git.Mirror(str(work), str(tmp_path / "mirror.git"), timeout=30)
    assert mirror.ensure(commit)
    mirror.archive(commit, str(tmp_path / "out.tar"), "source")
    with tarfile.open(tmp_path / "out.tar") as tar:
        packages = tar.extractfile("source/packages.nix")
        assert packages is not None
        assert packages.read() == b'{ rev = "$Format:%H$"; }\n'
