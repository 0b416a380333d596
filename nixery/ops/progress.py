"""Build progress on the terminal, for `nixery build`.

On a terminal, a live display (rich) shows the current phase, layers packed
so far and Nix's latest line, with Nix's log scrolling above it. Elsewhere
(a pipe, a CI log) each phase and each Nix line is one plain line.
"""

from __future__ import annotations

from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from nixery.images.activity import Build, BuildEvents, BuildRecord
from nixery.units import human_size

DETAIL_CHARS = 60


class ConsoleProgress(BuildEvents):
    """Build events for a person watching, plus steps outside the build."""

    def step(self, text: str) -> None: ...

    def close(self) -> None: ...


class PlainProgress(ConsoleProgress):
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._phase = ""

    def _say(self, text: str) -> None:
        print(f"nixery: {text}", file=self.out, flush=True)

    def build_started(self, build: Build) -> None:
        self._phase = build.phase
        self._say(f"{build.image}:{build.tag} for {build.platform}: {build.phase}")

    def build_phase(self, build: Build) -> None:
        if build.phase != self._phase:
            self._phase = build.phase
            self._say(build.phase + (f" {build.total} layers" if build.total else ""))

    def build_log(self, build: Build, line: str) -> None:
        print(f"  {line}", file=self.out, flush=True)

    def build_ended(self, build: Build, record: BuildRecord) -> None:
        if record.ok:
            self._say(
                f"built in {record.duration:.1f}s: {record.layers} layers "
                f"({record.packed} packed), {human_size(record.size)}"
            )
        else:
            self._say(f"failed after {record.duration:.1f}s: {record.error}")

    def step(self, text: str) -> None:
        self._say(text)


class LiveProgress(ConsoleProgress):
    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("[dim]{task.fields[detail]}"),
            console=console,
        )
        self._task: TaskID | None = None
        self.progress.start()

    def build_started(self, build: Build) -> None:
        self.progress.console.print(
            f"building [bold]{build.image}:{build.tag}[/] for {build.platform}"
        )
        self._task = self.progress.add_task(build.phase, total=None, detail="")

    def build_phase(self, build: Build) -> None:
        if self._task is not None:
            self.progress.update(
                self._task,
                description=build.phase,
                total=build.total or None,
                completed=build.done,
                detail="",
            )

    def build_log(self, build: Build, line: str) -> None:
        self.progress.console.print(line, style="dim", markup=False, highlight=False)
        if self._task is not None:
            self.progress.update(self._task, detail=line[:DETAIL_CHARS])

    def build_ended(self, build: Build, record: BuildRecord) -> None:
        if self._task is not None:
            label = "built" if record.ok else "failed"
            self.progress.update(self._task, description=label, total=1, completed=1, detail="")
        if record.ok:
            self.progress.console.print(
                f"built in {record.duration:.1f}s: {record.layers} layers "
                f"({record.packed} packed), {human_size(record.size)}"
            )

    def step(self, text: str) -> None:
        self.progress.console.print(text)

    def close(self) -> None:
        self.progress.stop()


def console_progress(out: TextIO) -> ConsoleProgress:
    """A live display on a terminal, plain lines otherwise."""
    if out.isatty():
        return LiveProgress(Console(file=out))
    return PlainProgress(out)
