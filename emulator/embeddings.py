"""Embeddings: deterministic unit vectors from the input (PROTOCOL-v1.md section 7).

Each input (a string, or an array of token ids) seeds its own vector, so the
same input always gets the same vector on every instance and a test can compute
what to expect with `embedding_vector`. With `dimensions`, the vector is the
first `dimensions` numbers of the full one, scaled back to unit length, as the
text-embedding-3 models shorten theirs. Numbers are float32, and `base64`
answers their little-endian bytes, which is how the SDK decodes them, so both
encodings carry the same vector. A string counts one token per word, a token
array one per id.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
from typing import Any

from .answers import words
from .errors import bad_request

MAX_INPUTS = 2048  # O/A/S: an array of at most 2048 inputs
ENCODINGS = ("float", "base64")

Input = str | list[int]


def check_embeddings_request(request: Any, full_dimensions: int) -> list[Input]:
    """Return the request's inputs as a list; raise ErrorAnswer(400) where Azure would refuse it.

    The messages are *inferred*: no source gives Azure's texts.
    """
    if not isinstance(request, dict):
        raise bad_request("The request body must be a JSON object.", None)
    given = request.get("input")
    if isinstance(given, str) or (
        isinstance(given, list) and given and all(is_token(t) for t in given)
    ):
        inputs: list[Input] = [given]
    elif (
        isinstance(given, list)
        and given
        and (
            all(isinstance(x, str) for x in given)
            or all(isinstance(x, list) and x and all(is_token(t) for t in x) for x in given)
        )
    ):
        inputs = given
    else:
        message = (
            "'input' must be a non-empty string, or an array of strings, of token ids or of "
            "non-empty arrays of token ids."
        )
        raise bad_request(message, "input")
    if len(inputs) > MAX_INPUTS:
        raise bad_request(
            f"'input' has {len(inputs)} items; at most {MAX_INPUTS} are allowed.", "input"
        )
    if any(item == "" for item in inputs):
        raise bad_request("'input' cannot contain an empty string.", "input")
    encoding = request.get("encoding_format")
    if encoding is not None and encoding not in ENCODINGS:
        raise bad_request(
            f"Invalid value for 'encoding_format': {encoding!r}; expected 'float' or 'base64'.",
            "encoding_format",
        )
    dimensions = request.get("dimensions")
    if dimensions is not None and (
        type(dimensions) is not int or not 1 <= dimensions <= full_dimensions
    ):
        raise bad_request(
            f"Invalid value for 'dimensions': {dimensions!r}; this model supports 1 to "
            f"{full_dimensions}.",
            "dimensions",
        )
    return inputs


def is_token(value: Any) -> bool:
    return type(value) is int and value >= 0


def embedding_vector(item: Input, dimensions: int, full_dimensions: int) -> list[float]:
    """The unit float32 vector for one input, `dimensions` long."""
    seed = hashlib.sha256(repr(item).encode()).digest()
    numbers = random.Random(seed)
    full = [numbers.uniform(-1.0, 1.0) for _ in range(full_dimensions)]
    kept = full[:dimensions]
    norm = math.sqrt(sum(value * value for value in kept)) or 1.0
    return float32([value / norm for value in kept])


def float32(values: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


def token_count(item: Input) -> int:
    return len(item) if isinstance(item, list) else len(words(item))


def embeddings_body(request: dict, inputs: list[Input], model: str, full_dimensions: int) -> dict:
    """Return the embeddings answer (O#CreateEmbeddingResponse)."""
    dimensions = request.get("dimensions") or full_dimensions
    as_base64 = request.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs):
        vector: list[float] | str = embedding_vector(item, dimensions, full_dimensions)
        if as_base64:
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(token_count(item) for item in inputs)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
