"""Failures the gateway expects, and the one place that maps upstream ones.

Everything raises `GatewayError`; `render_envelope` (the original API's
`{"success": 0, ...}` shape) and `render_openai_error` (OpenAI's and Azure's
`{"error": {...}}` shape) turn it into a body; an API face (gateway/faces.py)
says which of the two its callers get.

`map_upstream_status` (a non-200 answer), `map_transport_error` (no answer)
and `stream_failure` (a stream that timed out or broke) are the whole table
of what Azure's failures become.

Upstream answers keep their meaning: a 400 (content filter included) stays a
400 with Azure's error object, a 429 stays a 429 with a Retry-After the caller
can use. Azure's 401/403/404 mean *our* key or deployment is wrong, so the
caller gets a 502 that says so rather than a misleading 401.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from gateway.upstream.httpclient import HTTPTransportError

# Upstream statuses that another attempt (another deployment, or later) may fix.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class ConfigError(Exception):
    """Start-up configuration is incomplete or invalid; `problems` has one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class GatewayError(Exception):
    """An expected failure: the status, headers and error object the caller gets."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        rule: str | None = None,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        upstream_error: Mapping[str, Any] | None = None,
        upstream_status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        upstream_headers: Mapping[str, str] | None = None,
        summary: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.rule = rule
        self.error_type = error_type or _default_type(status)
        self.headers = dict(headers or {})
        self.upstream_error = dict(upstream_error) if upstream_error else None
        self.upstream_status = upstream_status
        # For failover: may another deployment be tried, and how long should
        # this one rest (None: let the backoff decide)?
        self.retryable = retryable
        self.retry_after = retry_after
        # Azure's response headers, for the request-id headers the caller gets.
        self.upstream_headers = upstream_headers
        # The envelope's top-level `message`, where it must differ from the error's own.
        self.summary = summary if summary is not None else message

    def error_object(self) -> dict[str, Any]:
        """The `error` member: Azure's own object when the failure is Azure's, else ours."""
        if self.upstream_error is not None and self.status < 500:
            return dict(self.upstream_error)
        error = {
            "code": self.code,
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
        }
        if self.rule:
            error["rule"] = self.rule
        return error


def _default_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status in (401, 403):
        return "authentication_error"
    if status < 500:
        return "invalid_request_error"
    return "upstream_error"


def render_envelope(error: GatewayError) -> dict[str, Any]:
    """The original API's error body."""
    return {"success": 0, "message": error.summary, "error": error.error_object()}


def render_openai_error(error: GatewayError) -> dict[str, Any]:
    """OpenAI's (and Azure's) error body, which the official SDKs parse."""
    body = error.error_object()
    body.setdefault("message", error.message)
    return {"error": body}


def retry_after_delay(headers: Mapping[str, str]) -> float | None:
    """Seconds Azure asks us to wait: `retry-after-ms` (preferred) or `retry-after`.

    These headers are input like any other: a value that is not a finite,
    non-negative number (`inf`, `nan`, `1e400`, `-1`, an HTTP date) is
    ignored, and the backoff decides. The caller caps what is left.
    """
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) / scale
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            return value
    return None


def retry_after_headers(delay: float | None) -> dict[str, str] | None:
    """Both headers clients read on a 429: `retry-after-ms` and `Retry-After` (whole seconds)."""
    if delay is None:
        return None
    return {
        "Retry-After": str(max(1, math.ceil(delay))),
        "retry-after-ms": str(round(delay * 1000)),
    }


def _parse_error_object(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return parsed["error"]
    return None


def map_upstream_status(
    status: int, headers: Mapping[str, str], body: bytes, *, max_cooldown: float
) -> GatewayError:
    """Turn a non-200 answer from Azure into the error the caller gets.

    `max_cooldown` caps the Retry-After passed on to the caller, as it caps
    how long a deployment rests (`DeploymentPool.cool_down`).
    """
    upstream = _parse_error_object(body)
    upstream_message = str((upstream or {}).get("message") or "").strip()
    if status == 429:
        delay = retry_after_delay(headers)
        wait = None if delay is None else min(delay, max_cooldown)
        return GatewayError(
            429,
            str((upstream or {}).get("code") or "rate_limited"),
            upstream_message or "Azure OpenAI rate limit reached; retry later.",
            headers=retry_after_headers(wait),
            upstream_error=upstream,
            upstream_status=status,
            upstream_headers=headers,
            retryable=True,
            retry_after=retry_after_delay(headers),
        )
    if status in (401, 403, 404):
        return GatewayError(
            502,
            "upstream_configuration",
            f"Azure OpenAI answered {status}: the gateway's key, endpoint or deployment "
            "is misconfigured. This is not a problem with your request.",
            upstream_status=status,
            upstream_headers=headers,
        )
    if status == 408:
        return GatewayError(
            504,
            "upstream_timeout",
            "Azure OpenAI timed out processing the request.",
            upstream_status=status,
            upstream_headers=headers,
            retryable=True,
            retry_after=retry_after_delay(headers),
        )
    if status >= 500 or status < 400:
        return GatewayError(
            502,
            "upstream_error",
            f"Azure OpenAI failed with status {status}"
            + (f": {upstream_message}" if upstream_message else "."),
            upstream_status=status,
            upstream_headers=headers,
            retryable=status in RETRYABLE_STATUSES,
            retry_after=retry_after_delay(headers),
        )
    return GatewayError(
        status,
        str((upstream or {}).get("code") or "upstream_rejected"),
        upstream_message or f"Azure OpenAI rejected the request with status {status}.",
        param=(upstream or {}).get("param"),
        upstream_error=upstream,
        upstream_status=status,
        upstream_headers=headers,
    )


def entra_refused(credential: str, refused: GatewayError) -> GatewayError:
    """Azure refused a fresh Entra ID token too: the identity's access, not the token's age."""
    return GatewayError(
        502,
        "upstream_configuration",
        f"Azure OpenAI answered 401 to a new Entra ID token ({credential}): grant that identity "
        "the role Cognitive Services OpenAI User on the resource. This is not a problem with "
        "your request.",
        upstream_status=refused.upstream_status,
        upstream_headers=refused.upstream_headers,
    )


def map_transport_error(error: HTTPTransportError) -> GatewayError:
    """Turn a failure to talk to Azure at all (refused, reset, timed out) into 502/504."""
    if error.kind == HTTPTransportError.TIMEOUT:
        return GatewayError(
            504,
            "upstream_timeout",
            f"Azure OpenAI did not answer in time ({error.message}).",
            retryable=True,
        )
    return GatewayError(
        502,
        "upstream_unreachable",
        f"Could not reach Azure OpenAI ({error.message}).",
        retryable=True,
    )


def invalid_success_body(headers: Mapping[str, str]) -> GatewayError:
    """Azure said 200 but sent something that is not a JSON object."""
    return GatewayError(
        502,
        "upstream_invalid_response",
        "Azure OpenAI answered 200 with a body that is not a JSON object.",
        upstream_status=200,
        upstream_headers=headers,
    )


def stream_failure(
    reason: str,
    *,
    started: bool,
    first_byte_timeout: float,
    idle_timeout: float,
    transport_error: HTTPTransportError | None = None,
) -> GatewayError:
    """What a stream that did not end with [DONE] becomes.

    `reason`: "first_byte_timeout", "idle", "cut" (the connection failed:
    `transport_error`) or "unfinished" (Azure closed it before [DONE]).
    `started`: events already reached the caller, so the error can only be
    the stream's last event, and no other deployment may be tried.
    """
    if reason == "first_byte_timeout":
        return GatewayError(
            504,
            "upstream_timeout",
            f"Azure OpenAI sent no response headers within {first_byte_timeout:g} s.",
            retryable=True,
        )
    if reason == "idle":
        return GatewayError(
            504,
            "stream_idle_timeout",
            f"Azure OpenAI sent nothing for {idle_timeout:g} s; the stream was closed.",
        )
    if reason == "cut" and transport_error is not None:
        if not started:
            return map_transport_error(transport_error)
        return GatewayError(
            502,
            "stream_interrupted",
            f"The stream from Azure OpenAI was cut ({transport_error.message}).",
        )
    return GatewayError(
        502,
        "stream_interrupted",
        "Azure OpenAI ended the stream before its final [DONE] event.",
    )
