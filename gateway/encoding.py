"""JSON as the gateway writes it: compact, by one encoder (orjson).

Bodies sent upstream (gateway/jsonbody.py), answers, stream events and
access-log lines all go through `compact_json`.
"""

from __future__ import annotations

from typing import Any

import orjson


def compact_json(payload: Any) -> bytes:
    """`payload` as compact JSON bytes (UTF-8, no spaces)."""
    return orjson.dumps(payload)


def compact_json_text(payload: Any) -> str:
    """The same, as text (for log lines)."""
    return orjson.dumps(payload).decode()
