#!/usr/bin/env python3
"""What the admission token estimate costs per request, by body and by way of counting.

    .venv/bin/python bench/estimate.py
    TIKTOKEN_CACHE_DIR=/path/to/cache .venv/bin/python bench/estimate.py

Prints microseconds per `TokenEstimator.estimate` call for a typical chat body
(system and user turns, a history, a low-detail image, one tool), a long
prompt (~100 KB) and a Responses body, counted by characters and, for each
encoding found in TIKTOKEN_CACHE_DIR, with tiktoken. Nothing leaves the machine.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.policy.estimate import (  # noqa: E402  (needs the root on sys.path)
    TokenEstimator,
    load_cached_encodings,
)

# Long enough for a stable figure, short enough to finish in seconds.
MIN_SECONDS = 0.5

SENTENCE = (
    "I would like to know which laptops have at least 32 GB of memory and weigh under 1.5 kg. "
)
TOOL = {
    "type": "function",
    "function": {
        "name": "search_catalogue",
        "description": "Search the product catalogue",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "max_weight_kg": {"type": "number"}},
            "required": ["query"],
        },
    },
}
TYPICAL_CHAT = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "You answer questions about our catalogue. Be concise."},
        {"role": "user", "content": SENTENCE * 3},
        {"role": "assistant", "content": "Here are a few options: " + "X1, 32 GB, 1.3 kg; " * 5},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And this one?"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + "A" * 20_000, "detail": "low"},
                },
            ],
        },
    ],
    "tools": [TOOL],
    "max_tokens": 500,
}
LONG_CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": SENTENCE * 1100}]}
RESPONSES = {
    "model": "gpt-4o",
    "instructions": "You answer questions about our catalogue.",
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": SENTENCE * 3}]},
        {"type": "function_call_output", "call_id": "call_1", "output": '{"items": 12}'},
    ],
    "tools": [TOOL["function"] | {"type": "function"}],
}
BODIES: dict[str, tuple[dict[str, Any], str]] = {
    "typical chat (0.7 KB of text)": (TYPICAL_CHAT, "chat"),
    "long chat (100 KB of text)": (LONG_CHAT, "chat"),
    "Responses with items": (RESPONSES, "responses"),
}


def microseconds_per_call(estimator: TokenEstimator, body: dict[str, Any], operation: str) -> float:
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < MIN_SECONDS:
        estimator.estimate(body, operation, ["gpt-4o"])  # type: ignore[arg-type]
        calls += 1
    return elapsed / calls * 1e6


def main() -> None:
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
    encodings = load_cached_encodings(cache_dir) if cache_dir else {}
    ways = {"characters": TokenEstimator()}
    if "o200k_base" in encodings:
        ways["tiktoken o200k_base"] = TokenEstimator(encodings)
    for label, (body, operation) in BODIES.items():
        for way, estimator in ways.items():
            estimate = estimator.estimate(body, operation, ["gpt-4o"])  # type: ignore[arg-type]
            cost = microseconds_per_call(estimator, body, operation)
            print(f"{label:32} {way:20} {cost:10.1f} µs  prompt {estimate.prompt_tokens} tokens")
    if len(ways) == 1:
        print("(no o200k_base in TIKTOKEN_CACHE_DIR: tiktoken not measured)")


if __name__ == "__main__":
    main()
