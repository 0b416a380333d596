"""The single place where Nixery starts subprocesses.

Every command is an argv list (never a shell string), runs in its own process
group so a timeout stops the whole tree, and fails with a typed error that
carries the argv, exit code and stderr. A caller may also receive stderr
line by line while the command runs (Nix reports its progress there). A
timeout first sends SIGTERM and waits a little: Nix runs its builders in
sessions of their own, out of reach of a group kill, and stops them itself
when it is terminated.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO

from nixery.errors import CommandError, CommandTimeout

log = logging.getLogger(__name__)

# After the process exits, how long its pipes may stay open (held by a
# stray grandchild) before we stop reading them.
DRAIN_TIMEOUT = 5.0
TERM_GRACE = 5.0  # seconds between SIGTERM and SIGKILL on a timeout


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
    on_stderr: Callable[[str], None] | None = None,
) -> Completed:
    """Run `argv` to completion; raise CommandError/CommandTimeout on failure.

    `on_stderr`, if given, is called with each stderr line (without its line
    break) as soon as the command writes it, from a reader thread.
    """
    if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
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
        errors="replace",
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out: list[str] = []
    err: list[str] = []
    readers = [
        _reader(proc.stdout, out.append, by_line=False),
        _reader(proc.stderr, _lines(err.append, on_stderr), by_line=True),
    ]
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        proc.wait()
        _join(readers)
        raise CommandTimeout(argv, timeout or 0, "".join(err)) from None
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    _join(readers)
    stdout, stderr = "".join(out), "".join(err)
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, stderr)
    return Completed(argv, stdout, stderr)


def _lines(
    keep: Callable[[str], None], on_line: Callable[[str], None] | None
) -> Callable[[str], None]:
    def take(line: str) -> None:
        keep(line)
        if on_line is not None:
            try:
                on_line(line.rstrip("\n"))
            except Exception:  # a broken listener must not break the command
                log.exception("stderr listener failed")

    return take


def _reader(stream: IO[str], take: Callable[[str], None], by_line: bool) -> threading.Thread:
    def pump() -> None:
        with stream:
            if by_line:
                for line in stream:
                    take(line)
            else:
                take(stream.read())

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(DRAIN_TIMEOUT)


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the group, then SIGKILL whatever is left after `TERM_GRACE`."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=TERM_GRACE)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[str], signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass
