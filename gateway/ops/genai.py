"""What a request and Azure's answer say, as the trace's GenAI attributes.

The pipeline calls these at its steps with the trace objects of
gateway/ops/tracing.py. Each returns at once when its trace records
nothing (tracing off), so a request then pays one attribute test per call.
No prompt or answer text is read unless the trace captures content
(`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.ops.tracing import AttemptTrace, RequestTrace
from gateway.upstream.sse import event_data

# An upstream operation (gateway/upstream/urls.py) as the conventions name it:
# (gen_ai.operation.name, openai.api.type). Responses is a chat operation.
OPERATIONS: Mapping[str, tuple[str, str | None]] = {
    "chat/completions": ("chat", "chat_completions"),
    "responses": ("chat", "responses"),
    "embeddings": ("embeddings", None),
}
# Responses' stream events that carry the whole response object.
_RESPONSE_EVENTS = (b'"response.created"', b'"response.completed"', b'"response.incomplete"')


def _may_end(event: bytes) -> bool:
    """Might this event carry a finish reason, or a Responses object?"""
    if b'"finish_reason"' in event:
        return b'"finish_reason":null' not in event
    return any(marker in event for marker in _RESPONSE_EVENTS)


def route_template(path: str, path_args: Sequence[str]) -> str:
    """The route's path with its arguments as `{name}`, named for the segment before them:
    `/openai/deployments/{deployment}/chat/completions` (low cardinality, for `http.route`)."""
    segments = path.split("/")
    for argument in path_args:
        for index, segment in enumerate(segments):
            if segment == argument and index > 0:
                name = segments[index - 1].removesuffix("s") or "id"
                segments[index] = "{" + name + "}"
                break
    return "/".join(segments)


def describe_request(
    trace: RequestTrace, operation: str, body: Mapping[str, Any], model: str | None
) -> None:
    """What the caller asked for: operation, model, max tokens, temperature, stream."""
    if not trace.recording:
        return
    name, api = OPERATIONS.get(operation, (operation, None))
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = body.get("max_output_tokens")
    temperature = body.get("temperature")
    trace.set_request(
        operation=name,
        model=model if model is not None else _text(body.get("model")),
        api=api,
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        temperature=float(temperature) if isinstance(temperature, (int, float)) else None,
        stream=bool(body.get("stream")),
    )
    messages = body.get("messages")
    if isinstance(messages, list):
        trace.record_input([m for m in messages if isinstance(m, Mapping)])
    elif isinstance(body.get("input"), str):
        trace.record_input([{"role": "user", "content": body["input"]}])
    elif isinstance(body.get("input"), list):
        trace.record_input([m for m in body["input"] if isinstance(m, Mapping)])


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _tokens(usage: Mapping[str, Any] | None) -> dict[str, int | None]:
    usage = usage or {}
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return {
        "input_tokens": prompt if isinstance(prompt, int) else None,
        "output_tokens": completion if isinstance(completion, int) else None,
    }


class AnswerReading:
    """What Azure's answer says about itself, gathered from the whole body or event by event."""

    def __init__(self, attempt: AttemptTrace) -> None:
        self.attempt = attempt
        self.model: str | None = None
        self.response_id: str | None = None
        self.finish_reasons: list[str] = []
        self._text: list[str] | None = [] if attempt.captures_content else None

    def read_document(self, document: Mapping[str, Any]) -> None:
        """A chat completion, a chat chunk, or a Responses object."""
        self.model = _text(document.get("model")) or self.model
        self.response_id = _text(document.get("id")) or self.response_id
        choices = document.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, Mapping):
                    continue
                reason = choice.get("finish_reason")
                if isinstance(reason, str) and reason:
                    self.finish_reasons.append(reason)
                if self._text is not None:
                    part = choice.get("delta") or choice.get("message") or {}
                    content = part.get("content") if isinstance(part, Mapping) else None
                    if isinstance(content, str):
                        self._text.append(content)
        status = document.get("status")
        if isinstance(status, str) and status not in ("in_progress", "queued"):
            self.finish_reasons = [status]
        if self._text is not None and isinstance(document.get("output_text"), str):
            self._text.append(document["output_text"])

    def read_events(self, events: Iterable[bytes]) -> None:
        """Stream events: only those that can name the model, the id or a finish are parsed."""
        for event in events:
            if self.response_id is not None and self._text is None and not _may_end(event):
                continue
            try:
                payload = json.loads(event_data(event))
            except ValueError:
                continue
            if not isinstance(payload, dict):
                continue
            response = payload.get("response")
            if isinstance(response, Mapping):
                self.read_document(response)
            else:
                self.read_document(payload)
            if self._text is not None and payload.get("type") == "response.output_text.delta":
                delta = payload.get("delta")
                if isinstance(delta, str):
                    self._text.append(delta)

    def report(self, usage: Mapping[str, Any] | None) -> None:
        """Hand everything read, and the answer's `usage`, to the attempt."""
        self.attempt.set_response(
            model=self.model,
            response_id=self.response_id,
            finish_reasons=self.finish_reasons or None,
            **_tokens(usage),
        )
        if self._text is not None:
            self.attempt.record_output(
                "".join(self._text), self.finish_reasons[0] if self.finish_reasons else None
            )


def describe_answer(
    attempt: AttemptTrace, document: Mapping[str, Any], usage: Mapping[str, Any] | None
) -> None:
    """A whole answer: its model, id, finish reasons and tokens."""
    if not attempt.recording:
        return
    reading = AnswerReading(attempt)
    reading.read_document(document)
    reading.report(usage)


def read_stream(attempt: AttemptTrace) -> AnswerReading | None:
    """A reader for a stream's events, or None when nothing is recorded."""
    return AnswerReading(attempt) if attempt.recording else None
