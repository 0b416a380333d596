"""The configuration reference's table against `nixery serve`'s real options: every
option is listed once, with the environment variables it reads and its default."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from nixery.cli import serve
from nixery.packages import sources

REFERENCE = Path(__file__).parent.parent / "docs" / "configuration.md"
SOURCE_DEFAULTS = {
    "channel": sources.DEFAULT_CHANNEL,
    "channel_revision_url": sources.CHANNEL_REVISION_URL,
}


def table_rows() -> dict[str, tuple[list[str], set[str], str]]:
    """Option -> (the row's options, its environment variables, its default cell)."""
    section = REFERENCE.read_text()
    rows: dict[str, tuple[list[str], set[str], str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if cells and cells[0].startswith("`--"):
            envvars = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[1]))
            options = re.findall(r"`(--[a-z0-9-]+)`", cells[0])
            for option in options:
                assert option not in rows, f"{option} listed twice"
                rows[option] = (options, envvars, cells[2])
    return rows


def serve_options() -> dict[str, click.Option]:
    return {
        max(p.opts, key=len): p
        for p in serve.params
        if isinstance(p, click.Option) and not p.hidden and p.name != "help"
    }


def test_every_serve_option_is_in_the_table_and_nothing_else() -> None:
    assert table_rows().keys() == serve_options().keys()


def envvars_of(param: click.Option) -> set[str]:
    return {param.envvar} if isinstance(param.envvar, str) else set(param.envvar or [])


def documented_default(param: click.Option) -> str | None:
    """The default as a person would write it, or None when there is none."""
    if isinstance(param.show_default, str):  # computed at run time, e.g. from $XDG_CACHE_HOME
        return param.show_default
    if param.name in SOURCE_DEFAULTS:  # applied when the package source is resolved
        return SOURCE_DEFAULTS[param.name]
    default = param.default
    if isinstance(default, bool) or not isinstance(default, str | int | float):
        return None
    return str(default)


@pytest.mark.parametrize("option", sorted(serve_options()))
def test_environment_and_default_match(option: str) -> None:
    param = serve_options()[option]
    together, envvars, cell = table_rows()[option]
    assert envvars == set().union(*(envvars_of(serve_options()[o]) for o in together))
    literal = re.fullmatch(r"`([^`]*)`( \(off\))?", cell)
    if literal:
        assert literal[1] == documented_default(param)
    elif param.is_flag:
        assert cell == "off" and param.default is not True
    elif not cell:
        assert documented_default(param) is None
    # Otherwise the cell says in words what is computed at run time ("host",
    # "cores", "per process").
