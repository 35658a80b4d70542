"""Chat completions: what the emulator answers a request, as JSON or as a stream (PROTOCOL.md)."""

from __future__ import annotations

import json
import math
import time
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
from .errors import bad_request
from .faults import filter_results

SYSTEM_FINGERPRINT = "fp_emulator"
RESULT_ROLES = ("tool", "function")  # a message that answers a call


class Choice(NamedTuple):
    """What one choice says: `content`, or a call of `function` with `arguments`."""

    content: str | None
    finish_reason: str
    function: str | None = None
    arguments: str = ""
    legacy: bool = False  # a `function_call` (deprecated API) rather than `tool_calls`


def message_text(content: Any) -> str:
    """Return a message's text, whether its `content` is a string or a list of parts."""
    if isinstance(content, list):
        texts = (
            part.get("text")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
        return " ".join(text for text in texts if isinstance(text, str))
    return content if isinstance(content, str) else ""


def prompt_filter_results() -> list[dict]:
    return [{"prompt_index": 0, "content_filter_results": filter_results("jailbreak")}]


def planned_call(request: dict) -> tuple[Function, bool] | None:
    """The function the answer calls, if any, and whether through the legacy `function_call` API."""
    messages = request["messages"]
    answered = messages[-1].get("role") in RESULT_ROLES
    tools = [tool.get("function") for tool in request.get("tools") or [] if isinstance(tool, dict)]
    tool_functions = [
        Function(tool.get("name"), tool.get("parameters"))
        for tool in tools
        if isinstance(tool, dict)
    ]
    if tool_functions:
        choice = request.get("tool_choice")
        forced = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
        chosen = choose_function(tool_functions, choice, forced, answered=answered)
        return None if chosen is None else (chosen, False)
    legacy = [
        Function(f.get("name"), f.get("parameters"))
        for f in request.get("functions") or []
        if isinstance(f, dict)
    ]
    choice = request.get("function_call")
    forced = choice.get("name") if isinstance(choice, dict) else None
    chosen = choose_function(legacy, choice, forced, answered=answered)
    return None if chosen is None else (chosen, True)


def plan_choices(request: dict) -> list[Choice]:
    """Decide every choice of the answer to a valid request."""
    users = [message for message in request["messages"] if message.get("role") == "user"]
    text = message_text(users[-1].get("content")) if users else ""
    call = planned_call(request)
    response_format = request.get("response_format") or {}
    json_mode = response_format.get("type") in ("json_object", "json_schema")
    schema = (response_format.get("json_schema") or {}).get("schema") if json_mode else None
    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    choices = []
    for index in range(request.get("n") or 1):
        if call is not None:
            function, legacy = call
            reason = "function_call" if legacy else "tool_calls"
            choices.append(Choice(None, reason, function.name, arguments(function, text), legacy))
            continue
        content = structured(schema, text) if json_mode else echo(text, index)
        if limit and len(words(content)) > limit:
            choices.append(Choice("".join(words(content)[:limit]), "length"))
        else:
            choices.append(Choice(content, "stop"))
    return choices


def usage(request: dict, choices: list[Choice]) -> dict:
    prompt = sum(
        len(words(message_text(message.get("content")))) for message in request["messages"]
    )
    completion = sum(
        len(words(choice.arguments if choice.function else choice.content)) for choice in choices
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_body(request: dict, choices: list[Choice], completion_id: str, model: str) -> dict:
    """Return the non-stream chat.completion answer (PROTOCOL.md section 3)."""

    def message(index: int, choice: Choice) -> dict:
        body: dict[str, Any] = {"role": "assistant", "content": choice.content, "refusal": None}
        call = {"name": choice.function, "arguments": choice.arguments}
        if choice.function is not None and choice.legacy:
            body["function_call"] = call
        elif choice.function is not None:
            body["tool_calls"] = [
                {"id": f"call_{completion_id}_{index}", "type": "function", "function": call}
            ]
        return body

    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": index,
                "message": message(index, choice),
                "logprobs": None,
                "finish_reason": choice.finish_reason,
                "content_filter_results": filter_results(
                    "protected_material_code", "protected_material_text"
                ),
            }
            for index, choice in enumerate(choices)
        ],
        "prompt_filter_results": prompt_filter_results(),
        "usage": usage(request, choices),
    }


def stream_payloads(
    request: dict,
    choices: list[Choice],
    completion_id: str,
    model: str,
    *,
    async_filter: bool = False,
) -> list[str]:
    """Return the `data:` payloads of the streamed answer, ending with [DONE] (PROTOCOL.md 4).

    With `async_filter`, as on deployments with asynchronous content filtering,
    an annotation event (empty id, `content_filter_offsets`, no `delta`)
    follows every second content chunk.
    """
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    head = {
        "created": int(time.time()),
        "id": completion_id,
        "model": model,
        "object": "chat.completion.chunk",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    } | ({"usage": None} if include_usage else {})
    safe = filter_results("protected_material_code", "protected_material_text")

    def chunk(
        index: int, delta: dict, finish_reason: str | None = None, filters: dict | None = None
    ) -> dict:
        return {
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "finish_reason": finish_reason,
                    "logprobs": None,
                    "content_filter_results": filters or {},
                }
            ]
        } | head

    chunks = [
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": prompt_filter_results(),
        }
        | ({"usage": None} if include_usage else {})
    ]
    for index, choice in enumerate(choices):
        chunks.append(
            chunk(index, {"role": "assistant", "content": "" if choice.function is None else None})
        )
        if choice.function is None:
            offset = 0
            for count, word in enumerate(words(choice.content), start=1):
                chunks.append(chunk(index, {"content": word}, filters=safe))
                offset += len(word)
                if async_filter and count % 2 == 0:
                    chunks.append(annotation(index, offset, safe))
        elif choice.legacy:
            chunks.append(
                chunk(index, {"function_call": {"name": choice.function, "arguments": ""}})
            )
            chunks += [
                chunk(index, {"function_call": {"arguments": piece}})
                for piece in thirds(choice.arguments)
            ]
        else:
            opening = {
                "index": 0,
                "id": f"call_{completion_id}_{index}",
                "type": "function",
                "function": {"name": choice.function, "arguments": ""},
            }
            chunks.append(chunk(index, {"tool_calls": [opening]}))
            chunks += [
                chunk(index, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                for piece in thirds(choice.arguments)
            ]
        chunks.append(chunk(index, {}, choice.finish_reason))
    if include_usage:
        chunks.append({"choices": []} | head | {"usage": usage(request, choices)})
    return [json.dumps(chunk, separators=(",", ":")) for chunk in chunks] + ["[DONE]"]


def annotation(index: int, offset: int, filters: dict) -> dict:
    """An asynchronous-filter event: which part of the text was checked, and the verdict."""
    return {
        "choices": [{
            "index": index,
            "finish_reason": None,
            "content_filter_results": filters,
            "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": offset},
        }],
        "created": 0, "id": "", "model": "", "object": "",
    }  # fmt: skip


def check_chat_request(request: Any) -> dict:
    """Return the parsed chat request; raise ErrorAnswer(400) where Azure would refuse it."""
    messages = request.get("messages") if isinstance(request, dict) else None
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        raise bad_request("'messages' is a required property", "messages")
    for name, high in (("n", 128), ("max_tokens", math.inf), ("max_completion_tokens", math.inf)):
        value = request.get(name)
        if value is not None and (type(value) is not int or not 1 <= value <= high):
            raise bad_request(f"Invalid value for '{name}': {value!r}.", name)
    return request
