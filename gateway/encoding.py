"""JSON as the gateway writes it: compact, with one encoder built once.

`json.dumps` with options builds a new encoder on every call; bodies, events
and access-log lines all go through this one instead.
"""

from __future__ import annotations

import json
from typing import Any

encode_compact = json.JSONEncoder(separators=(",", ":")).encode


def compact_json(payload: Any) -> bytes:
    """`payload` as compact JSON bytes (no spaces after separators)."""
    return encode_compact(payload).encode()
