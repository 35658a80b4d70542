"""The upstream error table and the two error shapes."""

import json

from gateway.errors import (
    GatewayError,
    map_transport_error,
    map_upstream_status,
    render_envelope,
    render_openai_error,
    retry_after_delay,
)
from gateway.upstream.httpclient import HTTPTransportError

CONTENT_FILTER = {
    "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {"hate": {"filtered": True, "severity": "high"}},
        },
    }
}


def retry_after_sent(headers):
    """The Retry-After a caller gets for Azure's 429 with `headers`."""
    return map_upstream_status(429, headers, b"", max_cooldown=60).headers.get("Retry-After")


def test_retry_after_prefers_milliseconds_and_rounds_up():
    assert retry_after_sent({"retry-after-ms": "300", "retry-after": "9"}) == "1"
    assert retry_after_sent({"retry-after-ms": "2500"}) == "3"
    assert retry_after_sent({"retry-after": "6"}) == "6"
    assert retry_after_sent({"retry-after": "soon"}) is None
    assert retry_after_sent({}) is None


def test_429_stays_429_with_retry_after():
    error = map_upstream_status(
        429,
        {"retry-after-ms": "1200"},
        b'{"error":{"code":"429","message":"Rate limit. Please retry after 2 seconds."}}',
        max_cooldown=60,
    )
    assert error.status == 429
    assert error.headers == {"Retry-After": "2", "retry-after-ms": "1200"}
    assert render_envelope(error)["error"]["code"] == "429"
    assert render_envelope(error)["message"] == "Rate limit. Please retry after 2 seconds."


def test_content_filter_400_keeps_azure_error_object():
    error = map_upstream_status(400, {}, json.dumps(CONTENT_FILTER).encode(), max_cooldown=60)
    assert error.status == 400
    assert render_envelope(error) == {
        "success": 0,
        "message": CONTENT_FILTER["error"]["message"],
        "error": CONTENT_FILTER["error"],
    }
    assert render_openai_error(error) == {"error": CONTENT_FILTER["error"]}


def test_our_misconfiguration_is_a_502_that_says_so():
    for status in (401, 403, 404):
        error = map_upstream_status(
            status, {}, b'{"error":{"code":"401","message":"Access denied"}}', max_cooldown=60
        )
        assert error.status == 502
        assert error.code == "upstream_configuration"
        assert "not a problem with your request" in error.message


def test_server_errors_and_timeouts():
    assert map_upstream_status(500, {}, b"oops", max_cooldown=60).status == 502
    assert map_upstream_status(503, {}, b"", max_cooldown=60).status == 502
    assert map_upstream_status(408, {}, b"", max_cooldown=60).status == 504


def test_other_4xx_keep_their_status():
    error = map_upstream_status(
        413, {}, b'{"error":{"code":"too_large","message":"Too big"}}', max_cooldown=60
    )
    assert (error.status, error.code, error.message) == (413, "too_large", "Too big")


def test_transport_errors():
    refused = map_transport_error(
        HTTPTransportError(HTTPTransportError.CONNECT, "Connection refused")
    )
    timed_out = map_transport_error(
        HTTPTransportError(HTTPTransportError.TIMEOUT, "Timeout during request.")
    )
    assert (refused.status, refused.code) == (502, "upstream_unreachable")
    assert (timed_out.status, timed_out.code) == (504, "upstream_timeout")


def test_our_own_error_object():
    error = GatewayError(
        400, "invalid_request", "Invalid request body: x", param="temperature", rule="maximum"
    )
    assert render_openai_error(error) == {
        "error": {
            "code": "invalid_request",
            "message": "Invalid request body: x",
            "type": "invalid_request_error",
            "param": "temperature",
            "rule": "maximum",
        }
    }


def test_retry_headers_that_are_not_finite_non_negative_numbers_are_ignored():
    for value in ("inf", "Infinity", "-inf", "nan", "1e400", "-5", "Wed, 21 Oct 2026 07:28:00 GMT"):
        assert retry_after_delay({"retry-after-ms": value}) is None, value
        assert retry_after_delay({"retry-after": value}) is None, value
    assert retry_after_delay({"retry-after-ms": "inf", "retry-after": "3"}) == 3.0


def test_the_retry_after_we_send_is_capped():
    assert retry_after_sent({"retry-after-ms": "99999999999"}) == "60"
    error = map_upstream_status(429, {"retry-after-ms": "99999999999"}, b"", max_cooldown=60)
    assert error.headers == {"Retry-After": "60", "retry-after-ms": "60000"}
    error = map_upstream_status(429, {"retry-after-ms": "1e400"}, b"", max_cooldown=60)
    assert error.status == 429 and error.headers == {} and error.retry_after is None
