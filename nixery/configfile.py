"""Configuration files: TOML whose keys are a command's long option names.

`serve --config FILE` feeds the file to click as defaults (a flag or an
environment variable still wins), and `check-config` runs the same click
parameters over it. Both work from the command's own parameter list, so an
option added to `serve` is accepted and checked without touching this module.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from nixery.errors import ConfigError, NixeryError

CONFIG_PARAM = "config"


def read(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def option_keys(command: click.Command) -> dict[str, click.Parameter]:
    """Every accepted key (a long option name, with dashes or underscores)."""
    keys: dict[str, click.Parameter] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == CONFIG_PARAM:
            continue
        for opt in param.opts:
            if opt.startswith("--"):
                keys[opt[2:]] = param
                keys[opt[2:].replace("-", "_")] = param
    return keys


def default_map(command: click.Command, path: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """Turn the file's keys into click's `default_map`; reject what click would misread."""
    keys = option_keys(command)
    values: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in data.items():
        param = keys.get(key)
        if param is None:
            errors.append(f"unknown option {key!r}")
        elif param.name in values:
            errors.append(f"option {key!r} is given twice")
        elif isinstance(value, dict):
            errors.append(f"option {key!r} takes a value, not a table")
        elif isinstance(value, list) and not param.multiple:
            errors.append(f"option {key!r} takes one value, not a list")
        else:
            assert param.name is not None
            # A lone value for a repeatable option is a list of one, not a string
            # for click to iterate character by character.
            values[param.name] = value if isinstance(value, list) or not param.multiple else [value]
    if errors:
        known = ", ".join(sorted(k for k in keys if "_" not in k))
        raise ConfigError(_problems(path, [*errors, f"known options: {known}"]))
    return values


def load_defaults(command: click.Command, path: str) -> dict[str, Any]:
    return default_map(command, path, read(path))


def check(
    command: click.Command,
    path: str,
    validate: Callable[[dict[str, Any]], object],
    syntax_only: bool = False,
) -> None:
    """Check `path` as `command` would read it, ignoring the environment.

    Every option's value goes through the option's own click type; then, unless
    `syntax_only`, the parsed options go through `validate` (what the command
    does before it starts) and named files must exist. Raises ConfigError
    listing every problem found.
    """
    values = load_defaults(command, path)
    checker = _file_only(command, relax_paths=syntax_only)
    errors: list[str] = []
    for name, value in values.items():
        try:
            checker.make_context(command.name, [], default_map={name: value})
        except click.ClickException as exc:
            errors.append(exc.format_message())
    if errors:
        raise ConfigError(_problems(path, list(dict.fromkeys(errors))))
    try:
        ctx = checker.make_context(command.name, [], default_map=values)
    except click.ClickException as exc:
        raise ConfigError(f"{path}: {exc.format_message()}") from exc
    if not syntax_only:
        try:
            validate(ctx.params)
        except NixeryError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


def _file_only(command: click.Command, relax_paths: bool) -> click.Command:
    """A copy of `command` that reads no environment variable and no config file."""
    checker = copy.copy(command)
    checker.params = []
    for param in command.params:
        if param.name == CONFIG_PARAM:
            continue
        param = copy.copy(param)
        param.envvar = None
        if relax_paths and isinstance(param.type, click.Path):
            relaxed = copy.copy(param.type)
            relaxed.exists = False
            param.type = relaxed
        checker.params.append(param)
    return checker


def _problems(path: str, lines: list[str]) -> str:
    return f"{path}:" + "".join(f"\n  {line}" for line in lines)
