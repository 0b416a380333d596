"""Git, through `process.run` only: listing a remote's refs and a local mirror.

A package-set repository is kept as a bare mirror in Nixery's source cache;
a commit is exported from it with `git archive` and then added to the Nix
store by `nix.py`. Image tags reach git only after validation, and never in
a position where git could read them as an option.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from nixery.errors import CommandError, CommandTimeout, SourceUnavailable
from nixery.packages import process

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
# `git archive` leaves out export-ignore files and expands export-subst
# placeholders; the mirror's own attributes, which win over the tree's, turn
# both off so that the export is the commit's content as Nix would see it.
ARCHIVE_ATTRIBUTES = "* -export-ignore -export-subst\n"
HEADS = "refs/heads/"
TAGS = "refs/tags/"


def is_commit(text: str) -> bool:
    return COMMIT_RE.fullmatch(text) is not None


def check_argument(value: str, what: str) -> str:
    """Refuse values git could take for an option (or that carry control characters)."""
    if not value or value.startswith("-") or any(ord(c) < 0x20 for c in value):
        raise ValueError(f"invalid {what}: {value[:80]!r}")
    return value


def _environment() -> dict[str, str]:
    # Never wait for a password on a terminal nobody watches.
    return {**os.environ, "GIT_TERMINAL_PROMPT": "0"}


def _git(argv: list[str], timeout: float, what: str) -> str:
    try:
        return process.run(["git", *argv], timeout=timeout, env=_environment()).stdout
    except (CommandError, CommandTimeout) as exc:
        raise SourceUnavailable(f"{what}: {exc}") from exc


@dataclass(frozen=True)
class RemoteRefs:
    """A remote's branches and tags (tags peeled to commits) and its HEAD."""

    refs: Mapping[str, str] = field(default_factory=dict)  # full ref name -> commit
    head: str | None = None  # the commit of the default branch

    def lookup(self, name: str) -> tuple[str, str] | None:
        """(full ref name, commit) for a short name; tags win, as in `git rev-parse`."""
        for ref in (TAGS + name, HEADS + name):
            if ref in self.refs:
                return ref, self.refs[ref]
        return None

    def names(self) -> list[str]:
        """Short names of every branch and tag."""
        return sorted(
            {r.removeprefix(p) for r in self.refs for p in (HEADS, TAGS) if r.startswith(p)}
        )


def parse_ls_remote(text: str) -> RemoteRefs:
    """Parse `git ls-remote` output; an annotated tag's peeled `^{}` line wins."""
    refs: dict[str, str] = {}
    peeled: dict[str, str] = {}
    head = None
    for line in text.splitlines():
        commit, _, ref = line.partition("\t")
        if not is_commit(commit):
            continue
        if ref == "HEAD":
            head = commit
        elif ref.endswith("^{}"):
            peeled[ref[:-3]] = commit
        elif ref.startswith((HEADS, TAGS)):
            refs[ref] = commit
    refs.update((ref, commit) for ref, commit in peeled.items() if ref in refs)
    return RemoteRefs(refs, head)


def ls_remote(url: str, timeout: float) -> RemoteRefs:
    check_argument(url, "repository URL")
    out = _git(["ls-remote", url, "HEAD", HEADS + "*", TAGS + "*"], timeout, f"listing {url}")
    return parse_ls_remote(out)


class Mirror:
    """A bare mirror of one remote repository in a local directory."""

    def __init__(self, url: str, directory: str, timeout: float):
        self.url = check_argument(url, "repository URL")
        self.directory = directory
        self.timeout = timeout

    def _git(self, argv: list[str], what: str) -> str:
        return _git(["--git-dir", self.directory, *argv], self.timeout, what)

    def has(self, commit: str) -> bool:
        if not os.path.isdir(self.directory):
            return False
        try:
            process.run(
                ["git", "--git-dir", self.directory, "cat-file", "-e", commit + "^{commit}"],
                timeout=self.timeout,
                env=_environment(),
            )
        except CommandError:
            return False
        return True

    def ensure(self, commit: str) -> bool:
        """Make `commit` present locally; False if the remote does not have it."""
        if not is_commit(commit):
            raise ValueError(f"not a commit: {commit[:80]!r}")
        if self.has(commit):
            return True
        if not os.path.isdir(self.directory):
            os.makedirs(os.path.dirname(self.directory), exist_ok=True)
            _git(["init", "--quiet", "--bare", self.directory], self.timeout, "creating mirror")
        self._git(
            ["fetch", "--quiet", "--prune", "--no-tags", self.url,
             f"+{HEADS}*:{HEADS}*", f"+{TAGS}*:{TAGS}*"],
            f"fetching {self.url}",
        )  # fmt: skip
        if self.has(commit):
            return True
        # A commit no branch or tag reaches: ask for it by name (servers may refuse).
        try:
            self._git(["fetch", "--quiet", "--no-tags", self.url, commit], "fetching a commit")
        except SourceUnavailable:
            return False
        return self.has(commit)

    def archive(self, commit: str, tar_file: str, prefix: str) -> None:
        """Write the commit's tree as an uncompressed tar under `prefix/`."""
        if not is_commit(commit):
            raise ValueError(f"not a commit: {commit[:80]!r}")
        info = os.path.join(self.directory, "info")
        os.makedirs(info, exist_ok=True)
        with open(os.path.join(info, "attributes"), "w") as fh:
            fh.write(ARCHIVE_ATTRIBUTES)
        self._git(
            ["archive", "--format=tar", f"--prefix={prefix}/", "-o", tar_file, commit],
            f"exporting {commit}",
        )
