"""Every command in the documentation is run by a test or by a documented script.

The pages are README.md, ARCHITECTURE.md and docs/*.md. Each line of a fenced
block without a language (or `sh`) is a command:

- `nixery ...` is parsed by the real command line: its subcommand, options
  and values must be valid (files it names come from the pages' own examples);
- anything else must be in RUN_ELSEWHERE, with the file that runs it and
  what that file must contain; `python -m` modules of the repository are
  started with `--help`.

Inline `nixery ...` commands must name real subcommands and options, and the
repository paths and local links in the pages must exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nixery.cli import main

ROOT = Path(__file__).parent.parent
# The Nix package's source holds the code, tests and docs, not the scripts and
# CI files these checks hold the pages against: a check of the repository.
pytestmark = pytest.mark.repo
PAGES = [
    page
    for page in [
        ROOT / "README.md",
        ROOT / "ARCHITECTURE.md",
        *sorted((ROOT / "docs").glob("*.md")),
    ]
    if page.exists()
]
SHELL = {"", "sh", "shell", "bash", "console"}
NIXERY = {"nixery", ".venv/bin/nixery"}

# Commands the tests cannot run as written (a client against a server started
# by hand, a script that installs the machine), by their first words: the file
# that runs them, and what that file must contain for the claim to hold.
RUN_ELSEWHERE: dict[str, tuple[str, tuple[str, ...]]] = {
    "scripts/bootstrap": (".ci/run", ("scripts/bootstrap",)),
    "scripts/test": (".ci/run", ("scripts/test",)),
    ".venv/bin/lint-imports": ("scripts/test", (".venv/bin/lint-imports --no-cache",)),
    ".venv/bin/python -m pytest": ("scripts/test", (".venv/bin/python -m pytest",)),
    "skopeo copy": ("tests/test_clients.py", ('"skopeo", "copy", "--src-tls-verify=false"',)),
    "podman pull": ("tests/test_clients.py", ('podman("pull"', '"--tls-verify=false"')),
    "podman run": ("tests/test_clients.py", ('podman("run"',)),
    "podman load": ("tests/test_build_cli.py", ('"load", "-i"',)),
    # The flake's app runs `nixery serve --default-pkgs-path NIXPKGS "$@"`;
    # the arguments after `--` are parsed as that command's below.
    "nix run": ("flake.nix", ('serve --default-pkgs-path ${nixpkgs} "$@"',)),
    # Started with `--help` below; the tests use the same server (conftest).
    ".venv/bin/python -m tests.s3server": ("tests/conftest.py", ("s3server.start(",)),
    ".venv/bin/python -m benchmarks.s3": ("benchmarks/README.md", ("benchmarks.s3",)),
}
# Blocks a test runs as written, by page and block language: the test file
# and what it must contain for the claim to hold.
RUN_AS_WRITTEN: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("docs/organisations.md", "sh"): (
        "tests/test_organisation.py",
        ('"docs" / "organisations.md"', 'page_blocks("sh")', "run_block("),
    ),
    ("docs/sbom.md", "console"): (
        "tests/test_e2e_sbom.py",
        ('"docs" / "sbom.md"', "console_example(", "def test_the_example_runs_as_written"),
    ),
}
# Top-level entries of the repository: a word starting with one is a path.
REPOSITORY = re.compile(
    r"^(?:\.\./)?((?:nixery|tests|benchmarks|scripts|deploy|docs|nix|\.ci)/[\w./-]*"
    r"|README\.md|ARCHITECTURE\.md)$"
)


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {shlex.join(self.argv)}"


@dataclass(frozen=True)
class Block:
    page: Path
    lang: str
    line: int  # of the first line inside the fence
    text: str


def blocks(page: Path) -> Iterator[Block]:
    lines = page.read_text().splitlines()
    fence: tuple[str, int] | None = None
    body: list[str] = []
    for number, line in enumerate(lines, 1):
        opening = re.match(r"^```(\S*)\s*$", line)
        if fence is None and opening:
            fence, body = (opening.group(1), number + 1), []
        elif fence is not None and line.startswith("```"):
            yield Block(page, fence[0], fence[1], "\n".join(body))
            fence = None
        elif fence is not None:
            body.append(line)
    assert fence is None, f"{page}: a fence is not closed"


def prose(page: Path) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)


def split_commands(block: Block) -> Iterator[Command]:
    """The simple commands of a shell block: lines joined at `\\` and open
    quotes, split at `&&`, `||`, `;` and `|`, without variable assignments
    in front or redirections."""
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        while True:
            if text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1] + " " + lines[i]
                continue
            try:
                lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                tokens = list(lexer)
            except ValueError:  # a quote goes on on the next line
                if i + 1 >= len(lines):
                    raise
                i += 1
                text += "\n" + lines[i]
                continue
            break
        i += 1
        argv: list[str] = []
        skip_next = False
        for token in [*tokens, ";"]:
            if skip_next:
                skip_next = False
            elif token in {">", ">>", "<", "2>", "&>"}:
                skip_next = True
            elif token in {"&&", "||", ";", "|", "&"}:
                if argv:
                    yield Command(
                        block.page.relative_to(ROOT).as_posix(), block.line + start, tuple(argv)
                    )
                argv = []
            elif not argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", token):
                continue  # an environment variable for the command
            else:
                argv.append(token)


def shell_commands() -> list[Command]:
    return [
        c
        for page in PAGES
        for b in blocks(page)
        if b.lang in SHELL and (page.relative_to(ROOT).as_posix(), b.lang) not in RUN_AS_WRITTEN
        for c in split_commands(b)
    ]


@pytest.mark.parametrize(("page", "lang"), RUN_AS_WRITTEN)
def test_blocks_run_as_written_are_run_by_their_test(page: str, lang: str) -> None:
    runner, needles = RUN_AS_WRITTEN[page, lang]
    assert any(b.lang == lang for b in blocks(ROOT / page)), f"{page} has no {lang} block"
    text = (ROOT / runner).read_text()
    for needle in needles:
        assert needle in text, f"{runner} does not run the {lang} blocks of {page} (no {needle!r})"


def parse_nixery(args: list[str]) -> None:
    """Parse `nixery ARGS` as the command line would, without running it."""
    root = click.Context(main, info_name="nixery")
    name, command, rest = main.resolve_command(root, args)
    assert name is not None and command is not None, args
    with command.make_context(name, rest, parent=root):
        pass


def prefix_of(argv: tuple[str, ...]) -> str | None:
    for prefix in sorted(RUN_ELSEWHERE, key=len, reverse=True):
        words = tuple(prefix.split())
        if argv[: len(words)] == words:
            return prefix
    return None


def check(argv: tuple[str, ...]) -> None:
    """Fail unless the command is parsed here or run by the file RUN_ELSEWHERE names."""
    for word in argv:
        found = REPOSITORY.match(word)
        if found:
            assert (ROOT / found.group(1)).exists(), f"{word} does not exist"
    if argv[0] in NIXERY:
        parse_nixery(list(argv[1:]))
        return
    prefix = prefix_of(argv)
    assert prefix is not None, (
        f"{shlex.join(argv)}: no test or script runs this; run it from a test, "
        "or add it to RUN_ELSEWHERE with the file that runs it"
    )
    runner, needles = RUN_ELSEWHERE[prefix]
    text = (ROOT / runner).read_text()
    for needle in needles:
        assert needle in text, f"{runner} does not run {prefix!r} (no {needle!r})"
    if prefix == "nix run" and "--" in argv:
        parse_nixery(["serve", "--default-pkgs-path", "/nix/store/x-nixpkgs", *_after(argv, "--")])
    if len(argv) > 2 and argv[1] == "-m" and argv[2].split(".")[0] in {"tests", "benchmarks"}:
        _start_with_help(argv[2])


def _after(argv: tuple[str, ...], marker: str) -> list[str]:
    return list(argv[argv.index(marker) + 1 :])


def _start_with_help(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


@pytest.fixture
def examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory in which the pages' commands find the files they name: the
    repository's own, and the configuration file the reference shows."""
    for entry in ("tests", "benchmarks", "scripts", "nix", "deploy"):
        (tmp_path / entry).symlink_to(ROOT / entry)
    toml = [b.text for b in blocks(ROOT / "docs" / "configuration.md") if b.lang == "toml"]
    (tmp_path / "nixery.toml").write_text(toml[0])
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("NIXERY_")]:
        monkeypatch.delenv(name)
    return tmp_path


COMMANDS = shell_commands()


def test_the_pages_show_commands() -> None:
    programs = {c.argv[0] for c in COMMANDS}
    assert {"scripts/bootstrap", "scripts/test", ".venv/bin/nixery", "nixery"} <= programs


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_command_is_run_by_a_test_or_a_script(command: Command, examples: Path) -> None:
    check(command.argv)


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (("nixery", "serve", "--no-such-option"), "No such option"),
        (("nixery", "build", "hello", "--output", "x", "--format", "tarball"), "tarball"),
        (("nixery", "serve", "--port", "eighty"), "eighty"),
        (("curl", "http://127.0.0.1:8080/v2/"), "no test or script runs this"),
        (("nixery", "build", "hello", "-o", "x", "--pkgs-path", "tests/nothing"), "does not"),
        (("nix", "run", ".", "--", "--layer-budget", "0"), "0"),
    ],
)
def test_the_check_refuses_what_nothing_runs(
    argv: tuple[str, ...], why: str, examples: Path
) -> None:
    with pytest.raises((AssertionError, click.ClickException)) as refused:
        check(argv)
    assert why in str(refused.value) or why in getattr(refused.value, "format_message", str)()


def test_config_examples_are_valid_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    examples = [b for page in PAGES for b in blocks(page) if b.lang == "toml"]
    assert examples
    for block in examples:
        tomllib.loads(block.text)
        path = tmp_path / "example.toml"
        path.write_text(block.text)
        result = CliRunner().invoke(main, ["check-config", "--syntax-only", str(path)])
        assert result.exit_code == 0, f"{block.page}:{block.line}: {result.output}"


INLINE = re.compile(r"`((?:\.venv/bin/)?nixery [^`]+)`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_inline_commands_name_real_subcommands_and_options(page: Path) -> None:
    for span in INLINE.findall(prose(page)):
        words = span.split()
        command = main.commands.get(words[1])
        assert command is not None, f"{page.name}: `{span}`: no command {words[1]!r}"
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        for option in re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", span):
            assert option in known, f"{page.name}: `{span}`: {words[1]} has no {option}"


def slug(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_repository_paths_and_links_exist(page: Path) -> None:
    text = prose(page)
    for span in re.findall(r"`([^`\s]+)`", text):
        found = REPOSITORY.match(span)
        if found:
            assert (ROOT / found.group(1)).exists(), f"{page.name}: `{span}` does not exist"
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", prose(linked), flags=re.MULTILINE)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: no #{anchor}"
