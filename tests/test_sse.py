"""Event framing: whole events out, bytes untouched, however the chunks are cut."""

import json

from gateway.upstream.sse import EventFramer, encode_event, event_data, is_done, usage_in

STREAM = (
    b'data: {"choices":[],"prompt_filter_results":[]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    b"data: [DONE]\n\n"
)


def test_whole_chunk_gives_every_event_unchanged():
    events = EventFramer().feed(STREAM)
    assert len(events) == 3
    assert b"".join(events) == STREAM


def test_events_split_at_every_byte_come_out_identical():
    framer = EventFramer()
    events = []
    for index in range(len(STREAM)):
        events += framer.feed(STREAM[index : index + 1])
    assert b"".join(events) == STREAM
    assert framer.pending == b""


def test_incomplete_event_is_held_back():
    framer = EventFramer()
    assert framer.feed(b'data: {"a":') == []
    assert framer.pending == b'data: {"a":'
    assert framer.feed(b"1}\n\n") == [b'data: {"a":1}\n\n']


def test_crlf_separators():
    events = EventFramer().feed(b"data: 1\r\n\r\ndata: 2\r\n\r\n")
    assert events == [b"data: 1\r\n\r\n", b"data: 2\r\n\r\n"]


def test_event_data_and_done():
    assert event_data(b"data: [DONE]\n\n") == b"[DONE]"
    assert event_data(b"event: x\ndata:a\ndata: b\n\n") == b"a\nb"
    assert is_done(b"data: [DONE]\r\n\r\n")
    assert not is_done(b'data: {"done": "[DONE]"}\n\n')


def test_encode_event():
    assert encode_event({"a": 1}) == b'data: {"a":1}\n\n'


def test_usage_in_finds_only_a_usage_object():
    usage = b'{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}'
    assert usage_in(b'data: {"choices":[],"usage":' + usage + b"}\n\n") == json.loads(usage)
    assert usage_in(b'data: {"usage": ' + usage + b',"choices":[]}\n\n') == json.loads(usage)
    assert usage_in(b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n') is None
    assert usage_in(b'data: {"choices":[{"delta":{"content":"\\"usage\\":{}"}}]}\n\n') is None
    assert usage_in(b"data: [DONE]\n\n") is None
    assert usage_in(b'data: {"usage":{"broken"\n\n') is None
