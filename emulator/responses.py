"""The Responses API: answers, stream events and stored responses (PROTOCOL-v1.md sections 3-6).

A response is answered as chat is (the echo of the last user text, one word one
token, a call of an offered function, a minimal instance of a `json_schema`
format). Stored responses (`store` defaults to true) live in a `ResponseStore`
on the emulator instance, so a `previous_response_id` or a retrieve reaches
only the instance that made the response, as a response lives on the Azure
resource that made it. `input_tokens` counts the instructions, this request's
input and, for a follow-up, the whole conversation before it (the previous
response's input and output tokens), as the model reads all of it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .answers import (
    Function,
    arguments,
    choose_function,
    echo,
    structured,
    thirds,
    words,
)
from .errors import bad_request, previous_response_not_found, response_not_found

MIN_OUTPUT_TOKENS = 16  # O#CreateResponse max_output_tokens minimum
ITEMS_PAGE = 20  # input_items `limit` default (O, A)
ITEMS_PAGE_MAX = 100
ACTIVE = ("queued", "in_progress")
TERMINAL_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete"}
TEXT_PARTS = ("input_text", "output_text", "text")
STREAM_OPTIONS = (
    "include_obfuscation",
)  # Azure refuses `include_usage` here: it is chat's (PROTOCOL-v1.md 4.1)


def new_id(prefix: str) -> str:
    """An opaque id like Azure's (a type prefix, 48 hex digits), unique across instances."""
    return f"{prefix}_{secrets.token_hex(24)}"


class Turn(NamedTuple):
    """What one response says: `text`, or a call of `function` with `arguments`."""

    text: str | None
    function: str | None = None
    arguments: str = ""
    incomplete: bool = False  # cut at max_output_tokens


@dataclass
class StoredResponse:
    """A response kept for retrieve, delete, cancel, input_items and follow-ups."""

    response: dict
    input_items: list[dict]
    deployment: str
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set once the response is final
    run: asyncio.Task[None] | None = None  # a background response's run

    @property
    def context_tokens(self) -> int:
        """The tokens a follow-up reads from this response: its whole input and its output."""
        usage = self.response.get("usage") or {}
        return usage.get("input_tokens", 0) + usage.get("output_tokens", 0)

    def settle(self, response: dict) -> None:
        self.response = response
        self.settled.set()


class ResponseStore:
    """The stored responses of one emulator instance, by id."""

    def __init__(self) -> None:
        self._responses: dict[str, StoredResponse] = {}

    def __contains__(self, response_id: str) -> bool:
        return response_id in self._responses

    def get(self, response_id: str) -> StoredResponse:
        """The stored response `response_id`; raise Azure's 404 if there is none."""
        stored = self._responses.get(response_id)
        if stored is None:
            raise response_not_found(response_id)
        return stored

    def previous(self, response_id: str) -> StoredResponse:
        """The response a follow-up continues; raise previous_response_not_found if none."""
        stored = self._responses.get(response_id)
        if stored is None:
            raise previous_response_not_found(response_id)
        return stored

    def put(self, stored: StoredResponse) -> None:
        self._responses[stored.response["id"]] = stored

    def delete(self, response_id: str) -> dict:
        """Forget a response (ending its run); return Azure's answer (A: `response.deleted`)."""
        stored = self.get(response_id)
        del self._responses[response_id]
        if stored.run is not None:
            stored.run.cancel()
        return {"object": "response.deleted", "id": response_id, "deleted": True}

    def runs(self) -> list[asyncio.Task[None]]:
        return [stored.run for stored in self._responses.values() if stored.run is not None]

    def clear(self) -> None:
        for run in self.runs():
            run.cancel()
        self._responses.clear()


def check_response_request(request: Any) -> dict:
    """Return the create request; raise ErrorAnswer(400) where Azure would refuse it.

    The messages are *inferred*, except `stream_options`' (BerriAI/litellm#28553).
    """
    if not isinstance(request, dict):
        raise bad_request("The request body must be a JSON object.", None)
    if not isinstance(request.get("input", ""), (str, list)):
        raise bad_request(
            "Invalid type for 'input': expected a string or an array of input items.", "input"
        )
    for key in request.get("stream_options") or {}:
        if key not in STREAM_OPTIONS:
            param = f"stream_options.{key}"
            raise bad_request(f"Unknown parameter: '{param}'.", param, "unknown_parameter")
    limit = request.get("max_output_tokens")
    if limit is not None and (type(limit) is not int or limit < MIN_OUTPUT_TOKENS):
        message = (
            f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
            f"{MIN_OUTPUT_TOKENS}, but got {limit!r} instead."
        )
        raise bad_request(message, "max_output_tokens", "integer_below_min_value")
    previous = request.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise bad_request(
            "Invalid type for 'previous_response_id': expected a string.", "previous_response_id"
        )
    if request.get("background") and request.get("store") is False:
        raise bad_request("Background mode requires 'store' to be true.", "background")
    return request


def input_items(request: dict) -> list[dict]:
    """The request's input as stored items (O#ItemResource): each with an id, content as parts."""
    given = request.get("input")
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    items = []
    for item in given or []:
        if not isinstance(item, dict):
            continue
        item = dict(item)
        if "role" in item and item.get("type", "message") == "message":
            part = "output_text" if item["role"] == "assistant" else "input_text"
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": part, "text": item["content"]}]
            item = {
                "id": item.get("id") or new_id("msg"),
                "type": "message",
                "status": "completed",
            } | item
        else:
            prefix = "fc" if item.get("type") == "function_call" else "item"
            item = {"id": item.get("id") or new_id(prefix)} | item
        items.append(item)
    return items


def item_text(item: dict) -> str:
    """The text an input item brings: a message's text parts, or a function result's output."""
    if item.get("type") == "function_call_output":
        output = item.get("output")
        return output if isinstance(output, str) else ""
    parts = item.get("content") if isinstance(item.get("content"), list) else []
    texts = [
        part.get("text")
        for part in parts
        if isinstance(part, dict) and part.get("type") in TEXT_PARTS
    ]
    return " ".join(text for text in texts if isinstance(text, str))


def plan_turn(request: dict, items: list[dict]) -> Turn:
    """Decide what the response says.

    The text echoed is the last user message's; a follow-up that brings only a
    function's result (the usual second turn of a tool call) echoes that result.
    """
    users = [item for item in items if item.get("type") == "message" and item.get("role") == "user"]
    text = item_text(users[-1]) if users else item_text(items[-1]) if items else ""
    answered = bool(items) and items[-1].get("type") == "function_call_output"
    tools = [
        tool
        for tool in request.get("tools") or []
        if isinstance(tool, dict) and tool.get("type") == "function"
    ]
    functions = [Function(tool.get("name"), tool.get("parameters")) for tool in tools]
    choice = request.get("tool_choice")
    forced = (
        choice.get("name")
        if isinstance(choice, dict) and choice.get("type") == "function"
        else None
    )
    function = choose_function(functions, choice, forced, answered=answered)
    if function is not None:
        return Turn(None, function.name, arguments(function, text))
    text_format = (request.get("text") or {}).get("format") or {}
    if text_format.get("type") in ("json_object", "json_schema"):
        content = structured(text_format.get("schema"), text)
    else:
        content = echo(text)
    limit = request.get("max_output_tokens")
    if limit is not None and len(words(content)) > limit:
        return Turn("".join(words(content)[:limit]), incomplete=True)
    return Turn(content)


def input_tokens(request: dict, items: list[dict], previous: StoredResponse | None) -> int:
    instructions = request.get("instructions")
    own = sum(len(words(item_text(item))) for item in items)
    return (
        len(words(instructions if isinstance(instructions, str) else ""))
        + own
        + (previous.context_tokens if previous else 0)
    )


def output_items(turn: Turn) -> list[dict]:
    if turn.function is not None:
        return [
            {
                "id": new_id("fc"),
                "type": "function_call",
                "status": "completed",
                "call_id": new_id("call"),
                "name": turn.function,
                "arguments": turn.arguments,
            }
        ]
    status = "incomplete" if turn.incomplete else "completed"
    part = {"type": "output_text", "text": turn.text, "annotations": [], "logprobs": []}
    return [
        {
            "id": new_id("msg"),
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [part],
        }
    ]


def response_object(
    request: dict,
    response_id: str,
    model: str,
    *,
    status: str,
    output: list[dict],
    usage: dict | None,
) -> dict:
    """The Response (O#Response, A#AzureResponse), with `output_text` as Azure sends it."""
    now = int(time.time())
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None

    def setting(name: str, default: Any) -> Any:
        value = request.get(name)
        return default if value is None else value

    return {
        "id": response_id,
        "object": "response",
        "created_at": now,
        "status": status,
        "background": bool(request.get("background")),
        "completed_at": now if status == "completed" else None,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "max_tool_calls": request.get("max_tool_calls"),
        "model": model,
        "output": output,
        "output_text": "".join(
            part.get("text", "")
            for item in output
            if item["type"] == "message"
            for part in item["content"]
        ),
        "parallel_tool_calls": setting("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": setting("reasoning", {"effort": None, "summary": None}),
        "store": request.get("store") is not False,
        "temperature": setting("temperature", 1.0),
        "text": setting("text", {"format": {"type": "text"}}),
        "tool_choice": setting("tool_choice", "auto"),
        "tools": setting("tools", []),
        "top_p": setting("top_p", 1.0),
        "truncation": setting("truncation", "disabled"),
        "usage": usage,
        "user": request.get("user"),
        "metadata": setting("metadata", {}),
    }


def response_usage(input_count: int, turn: Turn) -> dict:
    output = len(words(turn.arguments if turn.function is not None else turn.text))
    return {
        "input_tokens": input_count,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_count + output,
    }


def unfinished(response: dict, status: str = "in_progress") -> dict:
    """The response before its output: in `response.created`, or a background create's answer."""
    return response | {
        "status": status,
        "output": [],
        "output_text": "",
        "usage": None,
        "completed_at": None,
        "incomplete_details": None,
    }


def stream_events(response: dict) -> list[dict]:
    """The events of a streamed response, numbered from 0 (PROTOCOL-v1.md 4.2); no [DONE]."""
    start = unfinished(response)
    events: list[tuple[str, dict]] = [
        ("response.created", {"response": start}),
        ("response.in_progress", {"response": start}),
    ]
    for index, item in enumerate(response["output"]):
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            events.append(
                (
                    "response.output_item.added",
                    {
                        "output_index": index,
                        "item": item | {"status": "in_progress", "arguments": ""},
                    },
                )
            )
            events += [
                ("response.function_call_arguments.delta", where | {"delta": piece})
                for piece in thirds(item["arguments"])
            ]
            events.append(
                (
                    "response.function_call_arguments.done",
                    where | {"name": item["name"], "arguments": item["arguments"]},
                )
            )
        else:
            events.append(
                (
                    "response.output_item.added",
                    {
                        "output_index": index,
                        "item": item | {"status": "in_progress", "content": []},
                    },
                )
            )
            for content_index, part in enumerate(item["content"]):
                at = where | {"content_index": content_index}
                events.append(("response.content_part.added", at | {"part": part | {"text": ""}}))
                events += [
                    ("response.output_text.delta", at | {"delta": word, "logprobs": []})
                    for word in words(part["text"])
                ]
                events.append(
                    ("response.output_text.done", at | {"text": part["text"], "logprobs": []})
                )
                events.append(("response.content_part.done", at | {"part": part}))
        events.append(("response.output_item.done", {"output_index": index, "item": item}))
    events.append(
        (TERMINAL_EVENTS.get(response["status"], "response.failed"), {"response": response})
    )
    return [
        {"type": name, "sequence_number": number, **fields}
        for number, (name, fields) in enumerate(events)
    ]


def event_frame(event: dict) -> bytes:
    """One server-sent event: an `event:` line naming its type, then its JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def items_page(items: list[dict], query: dict[str, str]) -> dict:
    """A page of input items (O#ResponseItemList) by `limit`, `order` (desc), `after`, `before`."""
    limit = query.get("limit", str(ITEMS_PAGE))
    if not limit.isdigit() or not 1 <= int(limit) <= ITEMS_PAGE_MAX:
        raise bad_request(
            f"Invalid 'limit': expected an integer from 1 to {ITEMS_PAGE_MAX}, got {limit!r}.",
            "limit",
        )
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request(f"Invalid 'order': expected 'asc' or 'desc', got {order!r}.", "order")
    ordered = items if order == "asc" else items[::-1]
    for cursor in ("after", "before"):
        if cursor in query:
            at = next(
                (index for index, item in enumerate(ordered) if item["id"] == query[cursor]), None
            )
            if at is None:
                raise bad_request(
                    f"Invalid '{cursor}': no input item has id {query[cursor]!r}.", cursor
                )
            ordered = ordered[at + 1 :] if cursor == "after" else ordered[:at]
    page = ordered[: int(limit)]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(ordered) > len(page),
    }
