"""The subprocess choke point: stderr reaches listeners while a command runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nixery.errors import CommandError, CommandTimeout
from nixery.packages import process


def test_stderr_lines_arrive_while_the_command_runs(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    # The command waits for a file that only the listener creates, so it can
    # finish only if the first line is delivered before the command exits.
    script = (
        'echo first >&2; i=0; while [ ! -e "$1" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1));'
        ' done; [ -e "$1" ] || exit 3; echo second >&2; echo out'
    )
    seen: list[str] = []

    def listen(line: str) -> None:
        seen.append(line)
        if line == "first":
            gate.touch()

    done = process.run(["sh", "-c", script, "sh", str(gate)], timeout=30, on_stderr=listen)
    assert seen == ["first", "second"]
    assert done.stdout == "out\n"
    assert done.stderr == "first\nsecond\n"


def test_failures_keep_stderr_and_a_broken_listener_is_harmless() -> None:
    def broken(line: str) -> None:
        raise RuntimeError("listener bug")

    with pytest.raises(CommandError) as err:
        process.run(["sh", "-c", "echo boom >&2; exit 4"], on_stderr=broken)
    assert err.value.returncode == 4
    assert err.value.stderr == "boom\n"


def group_members(pgid: int) -> set[int]:
    """Live processes (not zombies) in process group `pgid`, from /proc."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after it.
        state, _ppid, pgrp = stat.rpartition(")")[2].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.add(int(entry.name))
    return members


def test_timeout_kills_the_group_and_keeps_what_was_said() -> None:
    lines: list[str] = []
    running: set[int] = set()

    def listen(line: str) -> None:
        lines.append(line)
        if line != "started":
            running.update(group_members(int(line.split()[0])))  # while the command runs

    with pytest.raises(CommandTimeout) as err:
        process.run(
            ["sh", "-c", 'echo started >&2; sleep 300 & echo "$$ $!" >&2; wait'],
            timeout=1,
            on_stderr=listen,
        )
    assert "started" in err.value.stderr
    assert lines[0] == "started" and len(lines) == 2
    shell, child = map(int, lines[1].split())
    assert running == {shell, child}  # the shell leads its own group; its child is in it
    # Both are gone once the call returns (SIGKILL may take a moment to land).
    assert wait_until_empty(lambda: group_members(shell)), group_members(shell)


def wait_until_empty(probe: Callable[[], set[int]], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_large_output_on_both_streams_does_not_deadlock() -> None:
    script = "i=0; while [ $i -lt 20000 ]; do echo line$i; echo err$i >&2; i=$((i+1)); done"
    count = 0
    lock = threading.Lock()

    def listen(line: str) -> None:
        nonlocal count
        with lock:
            count += 1

    done = process.run(["sh", "-c", script], timeout=60, on_stderr=listen)
    assert done.stdout.count("\n") == 20000
    assert count == 20000


def test_argv_must_be_a_list_of_strings() -> None:
    with pytest.raises(TypeError):
        process.run("echo hi")  # type: ignore[arg-type]
