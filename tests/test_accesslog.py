"""The access log: one line per request, the fields a gateway operator needs, no secrets."""

import json
import logging

import pytest

from emulator import Fault
from gateway.ops.accesslog import format_line

from .conftest import EMULATOR_KEY


def access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "azure-gpt-api.access"]


@pytest.mark.gen_test
async def test_one_json_line_per_request_with_its_fields(start_gateway, caplog):
    caplog.set_level(logging.INFO, logger="azure-gpt-api.access")
    gateway = start_gateway(LOG_FORMAT="json")
    await gateway.post(
        "/v1/gpt/chat",
        {"prompt": "secret prompt text", "stream": True},
        headers={"x-request-id": "req-1"},
    )
    gateway.emulator.add_fault(Fault(kind="content_filter"))
    await gateway.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}]},
        headers={"x-request-id": "req-2"},
    )
    await gateway.get("/nope")
    stream, filtered, missing = access_lines(caplog)
    assert stream["request_id"] == "req-1"
    assert (stream["route"], stream["status"], stream["upstream_status"], stream["attempts"]) == (
        "gpt_chat",
        200,
        200,
        1,
    )
    assert stream["deployment"] == "gpt-4o"
    assert stream["apim_request_id"]
    assert stream["duration_ms"] >= stream["ttft_ms"] > 0
    assert (filtered["route"], filtered["status"], filtered["upstream_status"]) == (
        "chat_completions",
        400,
        400,
    )
    assert (missing["route"], missing["status"]) == ("not_found", 404)
    assert "secret prompt text" not in caplog.text and EMULATOR_KEY not in caplog.text


def test_text_format_is_key_value_in_a_fixed_order():
    line = format_line({"status": 200, "time": "t", "route": "gpt_chat", "ttft_ms": None}, "text")
    assert line == "time=t route=gpt_chat status=200"
