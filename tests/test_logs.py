"""Log lines: one per event, with the request's context, as text or JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from nixery.ops import logs


@pytest.fixture
def capture() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def setup(fmt: str, stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", stream)
    logs.setup("info", fmt)


def test_json_lines_carry_the_context_and_the_event_fields(
    capture: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup("json", capture, monkeypatch)
    logs.begin(request_id="r-1")
    logs.bind(image="shell/hello", tag="latest")
    logging.getLogger("nixery.test").info("built %s", "it", extra={"layers": 3})
    logging.getLogger("nixery.test").debug("not shown")
    [line] = capture.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "built it"
    assert entry["level"] == "INFO" and entry["logger"] == "nixery.test"
    assert (entry["request_id"], entry["image"], entry["tag"]) == ("r-1", "shell/hello", "latest")
    assert entry["layers"] == 3
    assert "time" in entry


def test_text_lines_are_readable_and_a_new_request_starts_clean(
    capture: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup("text", capture, monkeypatch)
    logs.begin(request_id="r-2", image="a/b")
    logging.getLogger("nixery.test").warning("failed: %s", "boom", extra={"why": "two words"})
    logs.begin(request_id="r-3")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("nixery.test").exception("oops")
    first, second, *traceback = capture.getvalue().splitlines()
    assert "WARNING nixery.test: failed: boom" in first
    assert first.endswith("why='two words' request_id=r-2 image=a/b")
    assert second.endswith("oops request_id=r-3")
    assert traceback[0].startswith("Traceback") and traceback[-1] == "ValueError: bad"
