"""Reading an event-stream body the way a client does."""

from __future__ import annotations

from gateway.upstream.sse import EventFramer, event_data


def parse_events(body: bytes) -> list[bytes]:
    """The `data:` field of every whole event in `body`."""
    return [event_data(event) for event in EventFramer().feed(body)]
