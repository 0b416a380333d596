"""Build history, phases and the layer chart, without a server."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from nixery.http.web import CHART_WIDTH, layer_chart, time_ago
from nixery.images.activity import (
    FAILURE,
    SUCCESS,
    UNKNOWN_PACKAGES,
    Activity,
    Build,
    BuildEvents,
    Fanout,
)
from nixery.images.model import Layer
from nixery.storage import FilesystemStorage


def build(image: str = "shell/hello", clock: Callable[[], float] = time.monotonic) -> Build:
    return Build(image, "latest", "linux/amd64", ("hello",), "ab" * 32, clock=clock)


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_phases_add_up_per_step() -> None:
    clock = Clock()
    b = build(clock=clock)
    clock.now += 2
    b.enter("building")
    clock.now += 3
    b.enter("packing", total=3)
    b.advance()
    assert (b.phase, b.done, b.total) == ("packing", 1, 3)
    clock.now += 7
    b.enter("storing")
    clock.now += 11
    assert b.step_seconds() == {"nix": 5, "packing": 7, "storing": 11}
    assert b.elapsed() == 23
    clock.now += 13  # the current phase counts until the record is made
    record = b.record(SUCCESS, [(100, True), (50, False)])
    assert (record.layers, record.packed, record.size) == (2, 1, 150)
    assert record.steps == {"nix": 5, "packing": 7, "storing": 24}
    assert record.duration == 36


def test_history_is_kept_bounded_and_survives_a_restart(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path)
    activity = Activity(storage, keep=3)
    for i in range(5):
        b = build(f"image{i}")
        activity.build_started(b)
        assert activity.running() == [b]
        activity.build_ended(b, b.record(SUCCESS, [(10, True)]))
    failed = build("broken")
    activity.build_started(failed)
    activity.build_ended(failed, failed.record(FAILURE, error="boom", log_tail="nix said no"))
    typo = build("helo")
    activity.build_started(typo)
    activity.build_ended(typo, typo.record(UNKNOWN_PACKAGES, error="unknown packages: helo"))

    assert activity.running() == []
    assert [r.image for r in activity.builds()] == ["image4", "image3", "image2"]
    assert [r.log for r in activity.failures()] == ["nix said no"]

    again = Activity(FilesystemStorage(tmp_path), keep=3)
    assert again.builds() == activity.builds()
    assert again.failures() == activity.failures()
    assert again.find(activity.builds()[0].id) == activity.builds()[0]


def test_an_unreadable_history_is_ignored(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path)
    storage.put_document("activity/builds.json", b"{not json")
    assert Activity(storage).builds() == []


def test_fanout_reaches_every_listener() -> None:
    class Recorder(BuildEvents):
        def __init__(self) -> None:
            self.events: list[str] = []

        def build_log(self, build: Build, line: str) -> None:
            self.events.append(line)

        def cache_lookup(self, cache: str, hit: bool) -> None:
            self.events.append(f"{cache}:{hit}")

    a, b = Recorder(), Recorder()
    fan = Fanout(a, b)
    fan.build_log(build(), "building '/nix/store/x.drv'...")
    fan.cache_lookup("layer", True)
    assert a.events == b.events == ["building '/nix/store/x.drv'...", "layer:True"]


def test_layer_chart_scales_bars_to_the_biggest_layer() -> None:
    def layer(n: int, size: int, *names: str) -> Layer:
        paths = tuple(f"/nix/store/{str(n) * 32}-{name}" for name in names)
        return Layer(f"sha256:{str(n) * 64}", size, f"sha256:{str(n) * 64}", paths)

    layers = [layer(1, 4000, "glibc-2.36"), layer(2, 1000, "hello-2.10"), layer(3, 1)]
    chart = layer_chart(layers)
    assert [r.width for r in chart.rows] == [CHART_WIDTH, CHART_WIDTH / 4, 2.0]
    assert "glibc-2.36" in chart.rows[0].label and "hello-2.10" in chart.rows[1].title
    assert "root file system" in chart.rows[2].label
    assert len({r.y for r in chart.rows}) == 3


def test_time_ago_reads_naturally() -> None:
    now = 1_000_000.0
    assert time_ago(now - 5, now) == "just now"
    assert time_ago(now - 120, now) == "2 min ago"
    assert time_ago(now - 3 * 3600, now) == "3 hours ago"
    assert time_ago(now - 86400, now) == "1 day ago"
