"""Loading popularity data: package name (store path without hash) -> count."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from nixery.errors import ConfigError

Popularity = dict[str, int]


def load_popularity(source: str, timeout: float = 30.0) -> Popularity:
    """Read a popularity JSON object from a file path or an http(s) URL."""
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=timeout) as response:  # noqa: S310
                raw = response.read()
        else:
            raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read popularity data from {source}: {exc}") from exc
    return parse_popularity(raw, source)


def parse_popularity(raw: bytes, origin: str = "popularity data") -> Popularity:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{origin} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must be a JSON object of name -> count")
    bad = [k for k, v in data.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise ConfigError(f"{origin} has non-count values for: {', '.join(sorted(bad)[:5])}")
    return {str(k): int(v) for k, v in data.items()}
