"""Reading request headers without failing on bytes that are not UTF-8.

Bottle decodes header values as UTF-8 and raises on anything else, which
would turn a junk header into a 500. WSGI hands headers over as latin-1
text; every header Nixery reads is ASCII by grammar, so the raw text is
compared as it is and junk simply matches nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def header(environ: Mapping[str, Any], name: str, default: str = "") -> str:
    key = name.upper().replace("-", "_")
    if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        key = "HTTP_" + key
    value = environ.get(key, default)
    return value if isinstance(value, str) else default
