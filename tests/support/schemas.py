"""Walking our JSON Schema documents, for tests that hold every part of a schema to a rule."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def subschemas(node: Any) -> Iterator[dict[str, Any]]:
    """Yield every object in a schema document, the document itself first, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from subschemas(value)
    elif isinstance(node, list):
        for item in node:
            yield from subschemas(item)
