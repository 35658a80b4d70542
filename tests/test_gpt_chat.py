"""POST /v1/gpt/chat and the other original routes, over real sockets against the emulator."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging

import pytest
import tornado.web
from tornado.httpclient import HTTPClientError
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from emulator import Fault
from gateway.upstream.httpclient import KeepAliveHTTPClient
from gateway.upstream.sse import EventFramer, usage_in
from handlers.base import SECURITY_HEADERS

from .conftest import API_VERSION, DEPLOYMENT, EMULATOR_KEY, free_port
from .support.sse import parse_events

# --- the plain routes -------------------------------------------------------


@pytest.mark.gen_test
async def test_status_route_with_and_without_slash(gateway):
    for path in ("/v1", "/v1/"):
        response = await gateway.get(path)
        assert response.code == 200
        assert json.loads(response.body) == {"success": 1, "message": "GPT API: OK"}


@pytest.mark.gen_test
async def test_security_headers_and_no_server_banner(gateway):
    response = await gateway.get("/v1")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "Server" not in response.headers
    assert "Strict-Transport-Security" not in response.headers


@pytest.mark.gen_test
async def test_error_answers_carry_the_same_default_headers(gateway, monkeypatch):
    # send_error clears the response and sets the defaults again: none may be lost.
    def broken(*args):
        raise RuntimeError("a bug")

    ok = await gateway.post("/v1/gpt/chat", {"prompt": "hello"})
    not_found = await gateway.get("/nope")
    wrong_method = await gateway.get("/v1/gpt/chat")
    bad_body = await gateway.post("/v1/gpt/chat", b"{not json")
    monkeypatch.setattr("gateway.pipeline.Pipeline.candidates", broken)
    failed = await gateway.post("/v1/gpt/chat", {"prompt": "hello"})
    answers = (ok, not_found, wrong_method, bad_body, failed)
    assert [answer.code for answer in answers] == [200, 404, 405, 400, 500]
    for answer in answers:
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers.get_list(name) == [value], (answer.code, name)
        assert answer.headers.get_list("Access-Control-Allow-Origin") == ["*"]
        assert "Server" not in answer.headers
        assert "Strict-Transport-Security" not in answer.headers


@pytest.mark.gen_test
async def test_unknown_path_is_404_envelope(gateway):
    for method, path in (("GET", "/nope"), ("POST", "/v2/gpt/chat")):
        response = await gateway.client.fetch(
            gateway.url + path,
            method=method,
            body=b"{}" if method == "POST" else None,
            raise_error=False,
        )
        assert response.code == 404
        assert json.loads(response.body) == {
            "success": 0,
            "message": "API Not found.",
            "error": {
                "code": "not_found",
                "message": f"No route for {method} {path}",
                "type": "invalid_request_error",
                "param": None,
            },
        }


@pytest.mark.gen_test
async def test_wrong_method_is_405_envelope(gateway):
    response = await gateway.get("/v1/gpt/chat")
    assert response.code == 405
    body = json.loads(response.body)
    assert body["success"] == 0 and body["error"]["code"] == "method_not_allowed"
    assert "GET" in body["message"]


@pytest.mark.gen_test
async def test_cors_preflight_and_allowed_origins(start_gateway):
    open_gateway = start_gateway()
    preflight = await open_gateway.client.fetch(
        open_gateway.url + "/v1/gpt/chat",
        method="OPTIONS",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    )
    assert preflight.code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == "content-type,authorization"

    limited = start_gateway(CORS_ORIGINS="https://good.example")
    good = await limited.get("/v1", headers={"Origin": "https://good.example"})
    bad = await limited.get("/v1", headers={"Origin": "https://evil.example"})
    assert good.headers["Access-Control-Allow-Origin"] == "https://good.example"
    assert "Access-Control-Allow-Origin" not in bad.headers


# --- non-stream chat --------------------------------------------------------


@pytest.mark.gen_test
async def test_chat_returns_azure_json_plus_success(gateway):
    response = await gateway.post("/v1/gpt/chat", {"prompt": "hello there"})
    assert response.code == 200
    body = json.loads(response.body)
    assert body["success"] == 1
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "You said: hello there"
    assert body["usage"]["total_tokens"] > 0
    assert "prompt_filter_results" in body
    assert response.headers["apim-request-id"]
    assert response.headers["x-request-id"]


@pytest.mark.gen_test
async def test_upstream_request_url_key_and_message_order(gateway):
    await gateway.post(
        "/v1/gpt/chat",
        {
            "systemPrompt": "Be brief.",
            "userPrompt": "Hi",
            "assistantPrompt": "Hello!",
            "temperature": 0.2,
        },
        headers={"x-request-id": "trace-123"},
    )
    received = gateway.emulator.requests[-1]
    assert received.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert received.query == {"api-version": API_VERSION}
    assert received.headers["api-key"] == EMULATOR_KEY
    assert received.headers["x-request-id"] == "trace-123"
    assert received.json == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ],
        "temperature": 0.2,
    }


@pytest.mark.gen_test
async def test_env_defaults_fill_what_the_request_leaves_out(start_gateway):
    gateway = start_gateway(temperature="0.3", max_tokens="50", stop='["END"]', user="", top_p="")
    await gateway.post("/v1/gpt/chat", {"prompt": "x", "max_tokens": 7, "temperature": None})
    assert gateway.emulator.requests[-1].json == {
        "messages": [{"role": "user", "content": "x"}],
        "temperature": 0.3,
        "stop": ["END"],
        "max_tokens": 7,
    }


@pytest.mark.gen_test
async def test_json_answers_are_gzipped_when_asked(gateway):
    response = await gateway.post(
        "/v1/gpt/chat",
        {"prompt": "zip me " * 300},
        headers={"Accept-Encoding": "gzip"},
        decompress_response=False,
    )
    assert response.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(response.body))["success"] == 1


# --- bad input never reaches Azure -----------------------------------------


@pytest.mark.gen_test
async def test_bad_input_is_refused_before_the_upstream(start_gateway):
    gateway = start_gateway(MAX_BODY_SIZE="1000")
    cases = [
        ({"prompt": "x", "temperature": 3}, {}, 400, "invalid_request", "temperature"),
        ({"prompt": "x", "temprature": 1}, {}, 400, "invalid_request", "temprature"),
        ({"systemPrompt": "only"}, {}, 400, "invalid_request", None),
        (b"{not json", {}, 400, "invalid_json", None),
        (b"[1, 2]", {}, 400, "invalid_json", None),
        (
            b"prompt=hi",
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
            None,
        ),
        ({"prompt": "x" * 5000}, {}, 413, "body_too_large", None),
    ]
    for body, headers, status, code, param in cases:
        response = await gateway.post("/v1/gpt/chat", body, headers=headers)
        assert response.code == status, body
        error = json.loads(response.body)
        assert error["success"] == 0 and error["error"]["code"] == code
        assert error["error"]["param"] == param
        assert error["message"]
    assert gateway.emulator.requests == []


@pytest.mark.gen_test
async def test_oversized_body_gets_its_413_on_a_connection_that_stays_usable(start_gateway):
    gateway = start_gateway(MAX_BODY_SIZE="1000")
    client = KeepAliveHTTPClient(force_instance=True)
    try:
        big = await client.fetch(
            gateway.url + "/v1/gpt/chat",
            method="POST",
            body=json.dumps({"prompt": "y" * 300_000}),
            headers={"Content-Type": "application/json"},
            raise_error=False,
        )
        assert big.code == 413
        assert json.loads(big.body)["error"]["code"] == "body_too_large"
        after = await client.fetch(gateway.url + "/v1", raise_error=False)
        assert after.code == 200
    finally:
        client.close()


# --- upstream failures keep their meaning ----------------------------------


@pytest.mark.gen_test
async def test_429_stays_429_with_retry_after(gateway):
    gateway.emulator.add_fault(
        Fault(kind="rate_limit", headers={"retry-after-ms": "1500", "retry-after": "2"})
    )
    response = await gateway.post("/v1/gpt/chat", {"prompt": "x"})
    assert response.code == 429
    assert response.headers["Retry-After"] == "2"
    body = json.loads(response.body)
    assert body["success"] == 0 and body["error"]["code"] == "429"


@pytest.mark.gen_test
async def test_content_filter_400_stays_400_with_its_details(gateway):
    gateway.emulator.add_fault(Fault(kind="content_filter"))
    response = await gateway.post("/v1/gpt/chat", {"prompt": "x"})
    assert response.code == 400
    error = json.loads(response.body)["error"]
    assert error["code"] == "content_filter"
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"


@pytest.mark.parametrize("kind", ["server_error", "unavailable"])
@pytest.mark.gen_test
async def test_upstream_5xx_becomes_502(gateway, kind):
    gateway.emulator.add_fault(Fault(kind=kind))
    response = await gateway.post("/v1/gpt/chat", {"prompt": "x"})
    assert response.code == 502
    assert json.loads(response.body)["error"]["code"] == "upstream_error"


@pytest.mark.gen_test
async def test_wrong_key_or_deployment_is_our_502(start_gateway):
    for env in ({"KEY": "not-the-key"}, {"DEPLOYMENT_NAME": "missing"}):
        response = await start_gateway(**env).post("/v1/gpt/chat", {"prompt": "x"})
        assert response.code == 502
        body = json.loads(response.body)
        assert body["error"]["code"] == "upstream_configuration"
        assert "not-the-key" not in response.body.decode()


@pytest.mark.gen_test
async def test_refused_connection_is_502(start_gateway):
    gateway = start_gateway(ENDPOINT=f"http://127.0.0.1:{free_port()}", MAX_ATTEMPTS="1")
    for stream in (False, True):
        response = await gateway.post("/v1/gpt/chat", {"prompt": "x", "stream": stream})
        assert response.code == 502
        assert json.loads(response.body)["error"]["code"] == "upstream_unreachable"


@pytest.mark.gen_test
async def test_slow_upstream_is_504(start_gateway):
    gateway = start_gateway(REQUEST_TIMEOUT="0.3", MAX_ATTEMPTS="1")
    gateway.emulator.add_fault(Fault(hang=True))
    response = await gateway.post("/v1/gpt/chat", {"prompt": "x"})
    assert response.code == 504
    assert json.loads(response.body)["error"]["code"] == "upstream_timeout"


# --- streaming --------------------------------------------------------------


@pytest.mark.gen_test
async def test_stream_relays_every_event_unchanged_and_ends_with_done(gateway):
    response = await gateway.post(
        "/v1/gpt/chat",
        {"prompt": "stream this please", "stream": True},
        headers={"Accept-Encoding": "gzip"},
        decompress_response=False,
    )
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in response.headers
    upstream = gateway.emulator.requests[-1]
    assert upstream.json["stream_options"] == {"include_usage": True}  # asked for accounting
    sent = EventFramer().feed(upstream.response_body)
    assert response.body == b"".join(event for event in sent if usage_in(event) is None)
    events = parse_events(response.body)
    assert events[-1] == b"[DONE]"
    first = json.loads(events[0])
    assert first["choices"] == [] and first["prompt_filter_results"]
    text = "".join(
        chunk["choices"][0]["delta"].get("content") or ""
        for chunk in map(json.loads, events[1:-1])
        if chunk["choices"]
    )
    assert text == "You said: stream this please"


@pytest.mark.gen_test
async def test_stream_default_from_env(start_gateway):
    gateway = start_gateway(stream="true")
    response = await gateway.post("/v1/gpt/chat", {"prompt": "x"})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert gateway.emulator.requests[-1].json["stream"] is True


@pytest.mark.gen_test
async def test_first_event_arrives_before_the_upstream_has_finished(gateway):
    gateway.emulator.add_fault(Fault(chunk_gap=0.1))
    arrivals: list[bool] = []

    def on_chunk(chunk: bytes) -> None:
        arrivals.append(gateway.emulator.requests[-1].finished.is_set())

    response = await gateway.post(
        "/v1/gpt/chat",
        {"prompt": "one two three four five", "stream": True},
        streaming_callback=on_chunk,
    )
    assert response.code == 200
    assert len(arrivals) >= 5
    assert arrivals[0] is False
    assert gateway.emulator.requests[-1].finished.is_set()


@pytest.mark.gen_test
async def test_error_before_the_first_event_is_a_normal_error_response(gateway):
    gateway.emulator.add_fault(Fault(kind="rate_limit", headers={"retry-after-ms": "4000"}))
    response = await gateway.post("/v1/gpt/chat", {"prompt": "x", "stream": True})
    assert response.code == 429
    assert response.headers["Retry-After"] == "4"
    assert response.headers["Content-Type"].startswith("application/json")


@pytest.mark.gen_test
async def test_reset_mid_stream_ends_with_an_error_event_and_no_done(gateway):
    gateway.emulator.add_fault(Fault(reset_after=3))
    response = await gateway.post("/v1/gpt/chat", {"prompt": "a b c d e f g", "stream": True})
    assert response.code == 200
    events = parse_events(response.body)
    assert len(events) == 4
    assert b"[DONE]" not in events
    final = json.loads(events[-1])
    assert final["success"] == 0
    assert final["error"]["code"] == "stream_interrupted"
    assert final["message"]


@pytest.mark.gen_test
async def test_idle_stream_is_cut_with_an_error_event(start_gateway):
    gateway = start_gateway(STREAM_IDLE_TIMEOUT="0.3", MAX_ATTEMPTS="1")
    gateway.emulator.add_fault(Fault(chunk_gap=2.0))
    response = await gateway.post("/v1/gpt/chat", {"prompt": "a b c", "stream": True})
    events = parse_events(response.body)
    assert len(events) == 2
    assert json.loads(events[-1])["error"]["code"] == "stream_idle_timeout"
    await asyncio.wait_for(gateway.emulator.requests[-1].client_gone.wait(), 3)


@pytest.mark.gen_test
async def test_hang_before_headers_on_a_stream_is_504(start_gateway):
    gateway = start_gateway(FIRST_BYTE_TIMEOUT="0.3", MAX_ATTEMPTS="1")
    gateway.emulator.add_fault(Fault(hang=True))
    response = await gateway.post("/v1/gpt/chat", {"prompt": "x", "stream": True})
    assert response.code == 504
    assert json.loads(response.body)["error"]["code"] == "upstream_timeout"


@pytest.mark.gen_test(timeout=10)
async def test_caller_disconnect_closes_the_upstream_within_a_second(gateway):
    gateway.emulator.add_fault(Fault(chunk_gap=0.2))
    first_event = asyncio.Event()

    def on_chunk(chunk: bytes) -> None:
        first_event.set()
        raise ConnectionAbortedError("caller hangs up")

    request = asyncio.ensure_future(
        gateway.post(
            "/v1/gpt/chat",
            {"prompt": " ".join(["word"] * 50), "stream": True},
            streaming_callback=on_chunk,
        )
    )
    await asyncio.wait_for(first_event.wait(), 5)
    with pytest.raises(Exception):
        await request
    upstream = gateway.emulator.requests[-1]
    await asyncio.wait_for(upstream.client_gone.wait(), 1.5)
    assert not upstream.finished.is_set()


@pytest.mark.gen_test(timeout=10)
async def test_caller_disconnect_closes_a_slow_non_stream_call(gateway):
    gateway.emulator.add_fault(Fault(hang=True))
    with pytest.raises(HTTPClientError):
        await gateway.client.fetch(
            gateway.url + "/v1/gpt/chat",
            method="POST",
            body=json.dumps({"prompt": "x"}),
            headers={"Content-Type": "application/json"},
            request_timeout=0.3,
        )
    await asyncio.wait_for(gateway.emulator.requests[-1].client_gone.wait(), 1.5)


# --- secrets ----------------------------------------------------------------


@pytest.mark.gen_test
async def test_key_never_in_logs_or_responses(start_gateway, caplog):
    caplog.set_level(logging.DEBUG)
    gateway = start_gateway()
    seen = []
    for body in (
        {"prompt": "x"},
        {"prompt": "x", "stream": True},
        {"prompt": "x", "temperature": 9},
    ):
        seen.append(await gateway.post("/v1/gpt/chat", body))
    gateway.emulator.add_fault(Fault(kind="server_error"))
    seen.append(await gateway.post("/v1/gpt/chat", {"prompt": "x"}))
    seen.append(await start_gateway(KEY="wrong-key-value-77").post("/v1/gpt/chat", {"prompt": "x"}))
    for response in seen:
        text = response.body.decode() + str(list(response.headers.get_all()))
        assert EMULATOR_KEY not in text and "wrong-key-value-77" not in text
    assert caplog.records
    assert EMULATOR_KEY not in caplog.text and "wrong-key-value-77" not in caplog.text


class NotJsonUpstream(tornado.web.RequestHandler):
    def post(self, _deployment: str) -> None:
        self.set_header("Content-Type", "text/html")
        self.finish(b"<html>maintenance</html>")


@pytest.mark.gen_test
async def test_a_200_that_is_not_json_is_a_clear_502(start_gateway):
    app = tornado.web.Application(
        [(r"/openai/deployments/([^/]+)/chat/completions", NotJsonUpstream)]
    )
    sock, port = bind_unused_port()
    server = HTTPServer(app)
    server.add_sockets([sock])
    try:
        gateway = start_gateway(ENDPOINT=f"http://127.0.0.1:{port}", MAX_ATTEMPTS="1")
        response = await gateway.post("/v1/gpt/chat", {"prompt": "x"})
        assert response.code == 502
        assert json.loads(response.body)["error"]["code"] == "upstream_invalid_response"
    finally:
        server.stop()
