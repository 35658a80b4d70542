"""What the gateway reads in the Responses API's answers (PROTOCOL-v1.md sections 3 and 4).

The gateway relays a Responses stream byte for byte; it only needs to know
which event ends it (there is no `data: [DONE]`), where the usage is (the
full Response inside the terminal event), which id a created response got
(in `response.created`, so the response's deployment can be remembered), and
how to end a stream it must cut short so that the SDK raises.

Usage is given the chat names (`input_tokens` counted as prompt tokens,
`output_tokens` as completion tokens), so quotas, metrics and the access log
count both APIs alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.errors import GatewayError
from gateway.upstream.sse import event_data

TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed", "error"}
)
CREATED_EVENT = "response.created"


def event_type(event: bytes) -> str | None:
    """The `event:` name of one raw event, or else its data's `type`."""
    for line in event.splitlines():
        if line.startswith(b"event:"):
            return line[6:].strip().decode("utf-8", "replace")
    payload = _payload(event)
    kind = payload.get("type") if payload else None
    return kind if isinstance(kind, str) else None


def _payload(event: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(event_data(event))
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def ends_stream(event: bytes) -> bool:
    return event_type(event) in TERMINAL_EVENTS


def chat_named_usage(usage: Any) -> dict[str, Any] | None:
    """A Responses `usage` object with the chat names added (the original fields kept)."""
    if not isinstance(usage, dict):
        return None
    return {
        **usage,
        "prompt_tokens": usage.get("input_tokens") or 0,
        "completion_tokens": usage.get("output_tokens") or 0,
    }


def usage_in_answer(document: Mapping[str, Any]) -> dict[str, Any] | None:
    return chat_named_usage(document.get("usage"))


def usage_in_event(event: bytes) -> dict[str, Any] | None:
    """The usage of a terminal event's Response; None for every other event."""
    if b'"usage"' not in event or event_type(event) not in TERMINAL_EVENTS:
        return None
    payload = _payload(event)
    response = payload.get("response") if payload else None
    return chat_named_usage(response.get("usage")) if isinstance(response, dict) else None


def created_response(event: bytes) -> dict[str, Any] | None:
    """The Response of a `response.created` event; None for every other event."""
    if CREATED_EVENT.encode() not in event[:200] or event_type(event) != CREATED_EVENT:
        return None
    payload = _payload(event)
    response = payload.get("response") if payload else None
    return response if isinstance(response, dict) else None


def sequence_number(event: bytes | None) -> int:
    """The number the event after `event` takes (0 when there was none)."""
    payload = _payload(event) if event else None
    number = payload.get("sequence_number") if payload else None
    return number + 1 if isinstance(number, int) else 0


def error_event(error: GatewayError, last_event: bytes | None) -> bytes:
    """A stream's last event when the gateway must end it: Responses' `error` event.

    Its `error` member (the OpenAI error object) is what makes the SDK raise
    `APIError` rather than wait for a terminal event that will not come.
    """
    body = error.error_object()
    payload = {
        "type": "error",
        "code": body.get("code"),
        "message": body.get("message", error.message),
        "param": body.get("param"),
        "sequence_number": sequence_number(last_event),
        "error": body,
    }
    data = json.dumps(payload, separators=(",", ":"))
    return b"event: error\ndata: " + data.encode() + b"\n\n"
