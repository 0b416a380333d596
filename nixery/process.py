"""The single place where Nixery starts subprocesses.

Every command is an argv list (never a shell string), runs in its own process
group so a timeout kills the whole tree, and fails with a typed error that
carries the argv, exit code and stderr.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from nixery.errors import CommandError, CommandTimeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    stdout: str
    stderr: str


def run(
    argv: list[str],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Completed:
    """Run `argv` to completion; raise CommandError/CommandTimeout on failure."""
    if not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError("argv must be a non-empty list of strings")
    log.debug("running %s", argv)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        raise CommandTimeout(argv, timeout or 0, stderr) from None
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, stderr)
    return Completed(argv, stdout, stderr)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
