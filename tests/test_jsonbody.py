"""The strict JSON reader: one meaning for every body it accepts, a named rule for every one it refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.jsonbody import encode_body, parse_body

DEPTH = 64


def refused(raw: bytes) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        parse_body(raw, max_depth=DEPTH)
    assert caught.value.status == 400 and caught.value.code == "invalid_json"
    return caught.value


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def test_a_plain_body_parses_and_is_encoded_once():
    parsed = parse_body(
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}', max_depth=DEPTH
    )
    assert parsed.document == {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert parsed.encoded == b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'


@pytest.mark.parametrize(
    "raw, key",
    [
        (b'{"stream": true, "messages": [], "stream": false}', "stream"),
        (b'{"model":"gpt-4o","messages":[],"model":"gpt-4o-mini"}', "model"),
        (b'{"a" : 1 ,\n "a" : 2}', "a"),
        (b'{"tools":[{"function":{"name":"f","name":"g"}}]}', "name"),
        # Escaped quotes and colons inside strings do not hide a repeat...
        (b'{"x":"say \\"hi\\": ok","x":1}', "x"),
        (b'{"x":"\\\\","x":1}', "x"),
        (b'{"x":":colon first","x":1}', "x"),
        # ...nor does a key written with escapes.
        (b'{"model":1,"mo\\u0064el":2}', "model"),
    ],
)
def test_a_repeated_key_is_refused_by_name(raw, key):
    error = refused(raw)
    assert error.rule == "duplicate_key" and error.param == key
    assert f'"{key}"' in error.message


@pytest.mark.parametrize(
    "raw",
    [
        b'{"x":"say \\"hi\\": ok","y":1}',
        b'{"x":":colon first","y":[":",":"]}',
        b'{"a:":1,"b\\\\":2}',
        b'{"content":"{\\"temperature\\": 22, \\"unit\\": \\"c\\"}"}',
    ],
)
def test_strings_that_look_like_keys_are_not_repeats(raw):
    assert parse_body(raw, max_depth=DEPTH).document == json.loads(raw)


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"\xef\xbb\xbf{}", "byte-order mark"),
        ('{"prompt": "x"}'.encode("utf-16"), "UTF-16 or UTF-32"),
        ('{"prompt": "x"}'.encode("utf-16-le"), "UTF-16 or UTF-32"),
        ('{"prompt": "x"}'.encode("utf-32"), "UTF-16 or UTF-32"),
        (b'{"prompt": "\xed\xa0\x80"}', "not valid UTF-8 (byte 0xed at offset 12)"),
        (b'{"prompt": "\xff"}', "not valid UTF-8"),
        (b'{"prompt": "\\ud800"}', "surrogate"),
        (b'{"prompt": "\\udc00x"}', "surrogate"),
    ],
)
def test_anything_but_utf8_is_refused_saying_so(raw, words):
    error = refused(raw)
    assert error.rule == "encoding"
    assert words in error.message


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(literal):
    error = refused(b'{"prompt": "x", "temperature": ' + literal + b"}")
    assert error.rule == "syntax" and "NaN and Infinity are not JSON numbers" in error.message


def test_a_number_beyond_a_double_is_refused():
    assert "too large" in refused(b'{"temperature": 1e400}').message


def test_nesting_is_limited_without_recursion():
    assert parse_body(nested(DEPTH), max_depth=DEPTH).document is not None
    for levels in (DEPTH + 1, 1000, 100_000):
        error = refused(nested(levels))
        assert error.rule == "max_depth" and f"deeper than {DEPTH} levels" in error.message
    # Brackets inside strings are not nesting.
    assert parse_body(b'{"a": "' + b"[" * 500 + b'"}', max_depth=DEPTH).document["a"] == "[" * 500


def test_other_syntax_errors_say_where():
    for raw in (b"", b"{not json", b'{"a":1}x', b"[1,]", b"01"):
        assert refused(raw).rule == "syntax"


# --- the counting shortcut never misses a repeated key ----------------------

keys = st.sampled_from(["a", "b", 'q"', "c:", ":", "\\", " ", "é", "a\\"])
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.sampled_from('ab":\\ \t\n{}[],é'), max_size=8),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.lists(st.tuples(keys, inner), max_size=4)
    ),
    max_leaves=12,
)


def write(value: Any, draw_space: Any) -> str:
    """JSON text for `value`, where a list of pairs is an object that may repeat keys."""
    space = draw_space()
    if isinstance(value, list) and value and all(isinstance(item, tuple) for item in value):
        members = [f"{json.dumps(k)}{draw_space()}:{space}{write(v, draw_space)}" for k, v in value]
        return "{" + ",".join(members) + "}"
    if isinstance(value, list) and not value:
        return "[]" if draw_space() == "" else "{}"
    if isinstance(value, list):
        return "[" + f",{space}".join(write(item, draw_space) for item in value) + "]"
    return json.dumps(value, ensure_ascii=draw_space() == " ")


def first_repeat(text: str) -> str | None:
    found: list[str] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        found.extend(name for i, name in enumerate(names) if name in names[:i])
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return found[0] if found else None


@settings(max_examples=2000, derandomize=True, database=None, deadline=None)
@given(value=values, spaces=st.lists(st.sampled_from(["", " ", "\n", "\t "]), min_size=1))
def test_repeats_are_found_exactly_as_a_careful_parser_finds_them(value, spaces):
    cycle = iter(spaces * 200)
    text = write(value, lambda: next(cycle, ""))
    raw = text.encode()
    repeat = first_repeat(text)
    if repeat is None:
        parsed = parse_body(raw, max_depth=DEPTH)
        assert parsed.document == json.loads(text)
        assert json.loads(parsed.encoded) == parsed.document
    else:
        assert refused(raw).rule == "duplicate_key"


def test_encode_body_is_compact_utf8():
    assert encode_body({"a": "é", "b": [1, 2.5, None]}) == '{"a":"é","b":[1,2.5,null]}'.encode()
