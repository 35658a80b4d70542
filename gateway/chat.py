"""Build the Azure chat-completions body from the original API's request."""

from __future__ import annotations

from typing import Any, Mapping

from .config import PARAMETER_CASTS


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


def merge_parameters(
    request: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
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


def build_gpt_chat_body(
    request: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    return {"messages": build_prompt_messages(request), **merge_parameters(request, defaults)}
