"""What the emulated model says, whichever API asks: tokens, the echo, the function it calls.

Answers are deterministic so a test can predict every byte: a plain request is
answered "You said: <the last user text>", one word is one token, and a request
that gives functions gets a call of one of them with arguments that satisfy its
schema (see `instances`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

from .instances import echo_object, minimal_instance

WORD = re.compile(r"\s*\S+(?:\s+\Z)?")  # a word with the whitespace before it (and any trailing)


class Function(NamedTuple):
    """A function the request offers: its name and its parameters' JSON Schema (None: not given)."""

    name: str
    parameters: Any


def words(text: str | None) -> list[str]:
    """Split text into its tokens (words); they join back into exactly the text."""
    return WORD.findall(text or "")


def echo(text: str, index: int = 0) -> str:
    """The answer to a plain request (choice `index` of several says which it is)."""
    return f"You said{f' ({index})' if index else ''}: {text}"


def choose_function(
    functions: list[Function], choice: Any, forced: str | None, *, answered: bool
) -> Function | None:
    """Pick the function the model calls, or None for a text answer.

    `forced` names one (a named tool choice); otherwise `choice` "none" answers
    text, "required" calls the first function, and "auto" (or no choice: the
    default when functions are given) calls the first function unless the
    conversation ends with a function's result (`answered`), so that an agent
    loop ends with a text answer as it would with a real model.
    """
    if not functions:
        return None
    if forced is not None:
        return next(
            (function for function in functions if function.name == forced), Function(forced, None)
        )
    if choice == "none" or (choice != "required" and answered):
        return None
    return functions[0]


def arguments(function: Function, text: str) -> str:
    """The JSON arguments of a call: a minimal instance of the function's parameters."""
    if function.parameters is None:
        return json.dumps(echo_object(text))
    return json.dumps(minimal_instance(function.parameters, text))


def structured(schema: Any, text: str) -> str:
    """The content of a JSON-mode or `json_schema` answer: a minimal instance of `schema`."""
    return json.dumps(echo_object(text) if schema is None else minimal_instance(schema, text))


def thirds(text: str) -> list[str]:
    """Cut text into three pieces (fewer if it is very short), as call arguments are streamed."""
    size = max(1, math.ceil(len(text) / 3))
    return [text[start : start + size] for start in range(0, len(text), size)]
