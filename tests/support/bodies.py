"""Request bodies the tests send."""

from __future__ import annotations

from typing import Any


def chat(prompt: str = "hi", model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    """A chat-completions body with one user message."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
