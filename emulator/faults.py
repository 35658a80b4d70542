"""Injected failures: what the next requests answer instead of a good answer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from .errors import CONTENT_FILTERED, DEFAULT_RETRY_AFTER, azure_error

FILTER_CATEGORIES = ("hate", "self_harm", "sexual", "violence")
KIND_STATUS = MappingProxyType(
    {
        "rate_limit": 429,
        "content_filter": 400,
        "server_error": 500,
        "unavailable": 503,
        "timeout": 408,
    }
)


def filter_results(*detectors: str) -> dict:
    """Return content filter results with every category safe and nothing detected."""
    safe: dict = {name: {"filtered": False, "severity": "safe"} for name in FILTER_CATEGORIES}
    return safe | {name: {"filtered": False, "detected": False} for name in detectors}


@dataclass
class Fault:
    """One injected failure, applied to the next `times` API requests (FIFO queue).

    Every operation takes faults from the one queue: chat, Responses (create,
    retrieve, delete, cancel, input items), embeddings and models. `kind` presets
    (rate_limit, content_filter, server_error, unavailable, timeout) fill in the
    status, headers and body they imply and leave alone whatever is given; a
    `status` without a `body` gets Azure's body for it. `delay` comes before the
    answer (for a background response: how long its run takes), `hang` never
    answers (a background run never ends until cancelled), `chunk_gap` spaces
    stream events, `first_gap` is a silence after a stream's first event only (a
    reasoning model thinking once the stream started), and `reset_after` drops the connection after that many events
    (0 for a non-stream answer: before any byte).
    """

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: dict | None = None
    kind: str | None = None
    delay: float = 0.0
    chunk_gap: float = 0.0
    first_gap: float = 0.0
    reset_after: int | None = None
    hang: bool = False
    times: int = 1

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KIND_STATUS:
            raise ValueError(
                f"unknown fault kind {self.kind!r}; known kinds: {', '.join(KIND_STATUS)}"
            )
        if not all(
            isinstance(value, (int, float)) and value >= 0
            for value in (self.delay, self.chunk_gap, self.first_gap)
        ):
            raise ValueError(
                "fault delay, chunk_gap and first_gap must be numbers of seconds, not negative"
            )
        if self.reset_after is not None and not (
            isinstance(self.reset_after, int) and self.reset_after >= 0
        ):
            raise ValueError(f"fault reset_after must be an event count, not {self.reset_after!r}")
        if not isinstance(self.times, int) or self.times < 1:
            raise ValueError(f"fault times must be a positive integer, not {self.times!r}")
        self.headers = {name.lower(): str(value) for name, value in self.headers.items()}
        seconds = DEFAULT_RETRY_AFTER
        if self.kind == "rate_limit":
            # Keep the two headers (and the body's advice) consistent when only one is given.
            millis = self.headers.get("retry-after-ms")
            seconds = int(
                self.headers.get("retry-after")
                or (math.ceil(int(millis) / 1000) if millis else seconds)
            )
            self.headers = {
                "retry-after": str(seconds),
                "retry-after-ms": str(seconds * 1000),
            } | self.headers
        if self.kind == "content_filter" and self.body is None:
            filtered = filter_results("jailbreak") | {
                "violence": {"filtered": True, "severity": "medium"}
            }
            self.body = {
                "error": {
                    "message": CONTENT_FILTERED,
                    "type": None,
                    "param": "prompt",
                    "code": "content_filter",
                    "status": 400,
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": filtered,
                    },
                }
            }
        if self.kind is not None and self.status is None:
            self.status = KIND_STATUS[self.kind]
        if self.status is not None and self.body is None:
            self.body = azure_error(self.status, seconds=seconds)

    @classmethod
    def from_json(cls, obj: dict) -> Fault:
        """Build a fault from a JSON object; raise ValueError naming an unknown key."""
        if not isinstance(obj, dict):
            raise ValueError("a fault must be a JSON object")
        known = [f.name for f in fields(cls)]
        for key in obj:
            if key not in known:
                raise ValueError(f"unknown fault key {key!r}; known keys: {', '.join(known)}")
        try:
            return cls(**obj)
        except (TypeError, AttributeError) as error:
            raise ValueError(f"invalid fault {obj!r}: {error}") from None
