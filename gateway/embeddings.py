"""The usage of an embeddings answer, found without parsing the answer.

A batch of 2,048 inputs at 1,536 dimensions is some 65 MB of JSON floats;
`json.loads` of it holds the event loop for most of a second, every other
request waiting. The gateway needs only `usage`, and the vectors (numbers,
or base64 text) cannot contain the text `"usage"`, so its last occurrence
is the key: the object after it is decoded alone.
"""

from __future__ import annotations

import json
from typing import Any

_DECODER = json.JSONDecoder()
# More than any usage object takes (a few counts, perhaps their details).
MAX_USAGE_SIZE = 4096


def usage_in_body(body: bytes) -> dict[str, Any] | None:
    """The answer's `usage` object (`prompt_tokens`, `total_tokens`), or None."""
    key = body.rfind(b'"usage"')
    if key < 0:
        return None
    rest = body[key + 7 : key + 7 + MAX_USAGE_SIZE].lstrip()
    if not rest.startswith(b":"):
        return None
    try:
        usage, _end = _DECODER.raw_decode(rest[1:].lstrip().decode("utf-8"))
    except ValueError:
        return None
    return usage if isinstance(usage, dict) else None
