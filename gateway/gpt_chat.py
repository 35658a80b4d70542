"""Build the Azure chat-completions body from the original API's request."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.config import PARAMETER_CASTS
from gateway.errors import GatewayError
from gateway.validation import SCHEMA_DIR

PROMPT_FIELDS = ("prompt", "userPrompt", "systemPrompt", "assistantPrompt")


def _passthrough_fields() -> tuple[str, ...]:
    """The fields of `schema/gpt_chat.schema.json` the original did not have.

    They are sent as given, with no server default. `model` is known to the
    schema (clients send it) but not sent: this route chooses the deployment.
    """
    schema = json.loads((SCHEMA_DIR / "gpt_chat.schema.json").read_text())
    own = {*PROMPT_FIELDS, *PARAMETER_CASTS, "messages", "model"}
    return tuple(name for name in schema["properties"] if name not in own)


PASSTHROUGH_FIELDS = _passthrough_fields()


def _given(value: Any) -> bool:
    return value is not None and value != ""


def build_prompt_messages(request: Mapping[str, Any]) -> list[dict[str, str]]:
    """System (if given), user, assistant (if given): the order the original used."""
    messages = []
    if _given(request.get("systemPrompt")):
        messages.append({"role": "system", "content": request["systemPrompt"]})
    user = request.get("prompt") or request.get("userPrompt")
    messages.append({"role": "user", "content": user})
    if _given(request.get("assistantPrompt")):
        messages.append({"role": "assistant", "content": request["assistantPrompt"]})
    return messages


def merge_parameters(request: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Each parameter: the request's value, else the server default, else left out.

    Azure must never receive a null or an empty string for a parameter, so
    those count as "not given".
    """
    merged = {}
    for name in PARAMETER_CASTS:
        value = request.get(name)
        if not _given(value):
            value = defaults.get(name)
        if _given(value):
            merged[name] = value
    return merged


def build_gpt_chat_body(request: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The upstream body: a conversation (`messages`, or one built from the prompt fields)
    plus the parameters, defaults merged in."""
    if "messages" in request:
        mixed = [name for name in PROMPT_FIELDS if _given(request.get(name))]
        if mixed:
            raise GatewayError(
                400,
                "invalid_request",
                "Invalid request body: give either 'messages' or the prompt fields, not both "
                f"(found {', '.join(map(repr, mixed))} next to 'messages').",
                param="messages",
                rule="exclusive",
            )
        messages = request["messages"]
    else:
        messages = build_prompt_messages(request)
    body = {"messages": messages, **merge_parameters(request, defaults)}
    body.update((name, request[name]) for name in PASSTHROUGH_FIELDS if _given(request.get(name)))
    return body


# stream_options arrived in api-version 2024-09-01-preview; older versions reject it.
STREAM_USAGE_SINCE_API_VERSION = "2024-09-01"


def supports_stream_usage(api_version: str) -> bool:
    return api_version >= STREAM_USAGE_SINCE_API_VERSION


def caller_wants_stream_usage(body: Mapping[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def with_stream_usage(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body asking Azure for the usage event at the end of a stream (for accounting)."""
    return {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
