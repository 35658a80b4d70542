"""Server-sent events: cut a byte stream into whole events, without re-encoding them.

The relay forwards Azure's bytes as they came; it only needs to know where one
event ends, so that a final error event never lands inside a half-sent one,
and whether the stream reached its `data: [DONE]`.
"""

from __future__ import annotations

import json

from gateway.encoding import compact_json

_SEPARATORS = (b"\r\n\r\n", b"\n\n", b"\r\r")


class EventFramer:
    """Accumulate chunks and hand back each complete event's raw bytes."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Return the events completed by `chunk`, separator included."""
        buffer = self._buffer + chunk if self._buffer else chunk
        # Azure separates events with a blank line of LFs; CR forms are rarer.
        find_end = _crlf_event_end if b"\r" in buffer else _lf_event_end
        events = []
        start = 0
        while (end := find_end(buffer, start)) >= 0:
            events.append(buffer[start:end])
            start = end
        self._buffer = buffer[start:]
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not been completed yet."""
        return self._buffer


def _lf_event_end(buffer: bytes, start: int) -> int:
    index = buffer.find(b"\n\n", start)
    return -1 if index < 0 else index + 2


def _crlf_event_end(buffer: bytes, start: int) -> int:
    ends = [i + len(sep) for sep in _SEPARATORS if (i := buffer.find(sep, start)) >= 0]
    return min(ends) if ends else -1


def event_data(event: bytes) -> bytes:
    """The joined `data:` field of one raw event (spec: lines joined with LF)."""
    lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines)


def is_done(event: bytes) -> bool:
    # The substring test first: it is false for every event but the last.
    return b"[DONE]" in event and event_data(event).strip() == b"[DONE]"


def usage_in(event: bytes) -> dict | None:
    """The `usage` object of Azure's usage event, or None for any other event.

    Cheap for the common case: with `include_usage`, every other chunk
    carries `"usage":null`, and only an event whose last `"usage"` key is
    followed by an object is parsed.
    """
    key = event.rfind(b'"usage"')
    if key < 0 or not event[key + 7 : key + 16].lstrip(b": \t").startswith(b"{"):
        return None
    try:
        payload = json.loads(event_data(event))
    except ValueError:
        return None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    return usage if isinstance(usage, dict) else None


def encode_event(payload: object) -> bytes:
    """One `data:` event carrying a JSON payload."""
    return b"data: " + compact_json(payload) + b"\n\n"
