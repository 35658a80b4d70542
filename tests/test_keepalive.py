"""Keep-alive comments in live streams (STREAM_KEEPALIVE), over real sockets with the emulator.

The emulator's `first_gap` is a silence after a stream's first event, as a
reasoning model thinking after its stream started; `delay` is one before
Azure's headers, when no byte may reach the caller yet.
"""

from __future__ import annotations

import openai
import pytest

from emulator import Fault
from gateway.pipeline import KEEPALIVE_COMMENT
from gateway.upstream.sse import EventFramer, usage_in

from .conftest import DEPLOYMENT
from .support.bodies import chat
from .support.sse import parse_events


def split_comments(body: bytes) -> tuple[list[bytes], list[int]]:
    """The body's events without keep-alive comments, and the index each comment came after."""
    events: list[bytes] = []
    after: list[int] = []
    for event in EventFramer().feed(body):
        if event == KEEPALIVE_COMMENT:
            after.append(len(events))
        else:
            events.append(event)
    return events, after


@pytest.mark.gen_test(timeout=30)
async def test_a_silence_after_the_first_event_sends_comments_and_none_before_it(start_gateway):
    gateway = start_gateway(STREAM_KEEPALIVE="1", MAX_ATTEMPTS="1")
    # Two seconds before Azure's headers (no comment may go out), three after its first event.
    gateway.emulator.add_fault(Fault(delay=2, first_gap=3))
    response = await gateway.post("/v1/chat/completions", chat("think hard", stream=True))
    assert response.code == 200
    assert response.body.startswith(b"data: ")
    events, after = split_comments(response.body)
    # Every comment came in the silence after the first event, none before it or later.
    assert 1 <= len(after) <= 3 and set(after) == {1}
    # The events are Azure's, byte for byte, less the usage event the gateway asked for.
    upstream = EventFramer().feed(gateway.emulator.requests[-1].response_body)
    assert events == [event for event in upstream if usage_in(event) is None]
    assert parse_events(response.body)[-1] == b"[DONE]"


@pytest.mark.gen_test(timeout=30)
async def test_the_official_sdk_skips_the_comments_and_assembles_the_same_text(start_gateway):
    gateway = start_gateway(STREAM_KEEPALIVE="1", MAX_ATTEMPTS="1")
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused") as client:

        async def streamed_text() -> tuple[str, int]:
            stream = await client.chat.completions.create(
                model=DEPLOYMENT,
                messages=[{"role": "user", "content": "slow thoughts here"}],
                stream=True,
            )
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, len(chunks)

        quick = await streamed_text()
        gateway.emulator.add_fault(Fault(first_gap=3))
        kept_alive = await streamed_text()
    assert quick == kept_alive
    assert kept_alive[0] == "You said: slow thoughts here"


@pytest.mark.gen_test(timeout=30)
async def test_comments_do_not_count_as_events_for_the_idle_timeout(start_gateway):
    gateway = start_gateway(STREAM_KEEPALIVE="0.5", STREAM_IDLE_TIMEOUT="2", MAX_ATTEMPTS="1")
    gateway.emulator.add_fault(Fault(first_gap=20))
    response = await gateway.post("/v1/chat/completions", chat("never more", stream=True))
    assert response.code == 200
    events, after = split_comments(response.body)
    assert len(after) >= 1 and set(after) == {1}
    # Azure stayed silent for STREAM_IDLE_TIMEOUT, comments or not: the stream was cut.
    last = parse_events(events[-1])[0]
    assert b'"error"' in last and b"[DONE]" not in b"".join(events)
    assert gateway.emulator.requests[-1].client_gone.is_set()


@pytest.mark.gen_test(timeout=30)
async def test_zero_turns_keepalive_off(start_gateway):
    gateway = start_gateway(STREAM_KEEPALIVE="0", MAX_ATTEMPTS="1")
    gateway.emulator.add_fault(Fault(first_gap=1.5))
    response = await gateway.post("/v1/chat/completions", chat("quiet please", stream=True))
    assert response.code == 200
    events, after = split_comments(response.body)
    assert after == [] and b": keep-alive" not in response.body
    assert parse_events(response.body)[-1] == b"[DONE]"
