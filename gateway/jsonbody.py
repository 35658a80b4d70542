"""The one strict reader of JSON request bodies: what the gateway checks is what Azure reads.

RFC 8259 leaves some choices to each parser; a body that depends on one of
them could mean one thing to the gateway and another to Azure. So a body is
refused (400 `invalid_json`, the rule named) when it:

- is not UTF-8 (§8.1): a byte-order mark, UTF-16 or UTF-32, an invalid
  sequence (UTF-8-encoded surrogates included), or an escaped lone surrogate;
- uses `NaN`, `Infinity` or a number beyond the range of a double (`1e400`);
- repeats a key in one object (§4: "the behavior ... is unpredictable");
- nests arrays and objects deeper than `max_depth`.

What goes upstream is the parsed document encoded once, never the caller's
bytes: that encoding is made anyway for the repeated-key count below, so
sending it costs no more than sending the caller's bytes would, and leaves
nothing for another parser to read differently (bench/README.md has the cost).

orjson (C) does the parsing and refuses all but the last two itself, with a
depth limit of its own (1024) and no recursion in Python; its encoder stops at
254 levels, which bounds `max_depth` (config.MAX_JSON_DEPTH_LIMIT). It keeps
the last of repeated keys, so they are found by counting: every key ends with
an unescaped `"` and a `:` (whitespace between allowed) in the caller's bytes,
and with an unescaped `":` in orjson's compact encoding, so a body without
repeated keys shows as many key ends in both. Counting is a few `bytes.count`
calls; only when the counts cannot be compared exactly (a string that starts
with `:`, whitespace after a quote in the caller's bytes) or differ does the
body go through the careful path, the standard library's parser with a hook
on every object, which also names the key.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

import orjson

from gateway.encoding import compact_json
from gateway.errors import GatewayError

_BOM = b"\xef\xbb\xbf"
_MAX_SHOWN_KEY = 60
# A `"`, then JSON whitespace, then `:`: the end of a key (or the opening quote
# of a string that starts with a colon). The look-behind and the pairs of
# backslashes keep to quotes that are not escaped.
_KEY_END = re.compile(rb'(?<!\\)(?:\\\\)*"[ \t\n\r]*:')
_QUOTE_THEN_SPACE = re.compile(rb'"[ \t\n\r]')
# In orjson's compact encoding a string opens after one of `{ [ , :`; one that
# opens with a colon looks like a key end.
_OPENS_WITH_COLON = re.compile(rb'[{\[,:]":')


class ParsedBody(NamedTuple):
    document: Any
    # The document as compact JSON: what goes upstream when it is sent as it is.
    encoded: bytes


def encode_body(document: Any) -> bytes:
    """`document` as compact JSON, for a body the gateway builds or changes."""
    return compact_json(document)


def parse_body(raw: bytes, *, max_depth: int) -> ParsedBody:
    """The document in `raw` and its encoding, or a 400 GatewayError naming the rule it breaks."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise _refusal(raw, error, max_depth) from None
    if raw.count(b"{") + raw.count(b"[") > max_depth and _depth(document) > max_depth:
        raise _too_deep(max_depth)
    encoded = compact_json(document)
    if _key_ends(raw) != _keys_in(encoded):
        _find_repeated_key(raw)
    return ParsedBody(document, encoded)


def _escaped_before(text: bytes, tail: bytes) -> int:
    """How many `tail`s in `text` follow an odd run of backslashes (so their quote is escaped)."""
    odd, run, count = 0, 1, text.count(b"\\" + tail)
    while count:
        nxt = text.count(b"\\" * (run + 1) + tail)
        if run % 2:
            odd += count - nxt
        run, count = run + 1, nxt
    return odd


def _key_ends(raw: bytes) -> int:
    """At least the number of keys in `raw`, counting repeats: each key's end matches once."""
    if _QUOTE_THEN_SPACE.search(raw):
        return len(_KEY_END.findall(raw))
    escaped = _escaped_before(raw, b'":') if b'\\":' in raw else 0
    return raw.count(b'":') - escaped


def _keys_in(encoded: bytes) -> int:
    """The number of keys in orjson's encoding of a document; -1 if it cannot be counted exactly."""
    if _OPENS_WITH_COLON.search(encoded):
        return -1
    escaped = _escaped_before(encoded, b'":') if b'\\":' in encoded else 0
    return encoded.count(b'":') - escaped


def _depth(document: Any) -> int:
    """How deeply `document` nests, counted without recursion."""
    if not isinstance(document, (dict, list)):
        return 0
    deepest = 0
    stack = [(document, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _find_repeated_key(raw: bytes) -> None:
    """Raise the 400 for the first repeated key, if there is one (orjson has checked the rest)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        document = dict(pairs)
        if len(document) < len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise _repeated(key)
                seen.add(key)
        return document

    # Nesting is within max_depth here, so the standard parser's recursion is bounded.
    json.loads(raw.decode(), object_pairs_hook=unique)


def _repeated(key: str) -> GatewayError:
    shown = json.dumps(key)
    if len(shown) > _MAX_SHOWN_KEY:
        shown = shown[: _MAX_SHOWN_KEY - 4] + '..."'
    return GatewayError(
        400,
        "invalid_json",
        f"The request body has the key {shown} twice in one object; "
        "JSON object keys must be unique.",
        param=key if len(key) <= _MAX_SHOWN_KEY else None,
        rule="duplicate_key",
    )


def _too_deep(max_depth: int) -> GatewayError:
    return GatewayError(
        400,
        "invalid_json",
        f"The request body nests arrays and objects deeper than {max_depth} levels.",
        rule="max_depth",
    )


def _invalid(message: str, rule: str) -> GatewayError:
    return GatewayError(400, "invalid_json", message, rule=rule)


def _refusal(raw: bytes, error: orjson.JSONDecodeError, max_depth: int) -> GatewayError:
    """The 400 for a body orjson refused, saying why in the caller's terms."""
    if raw.startswith(_BOM):
        return _invalid(
            "The request body starts with a byte-order mark; send UTF-8 JSON without one.",
            "encoding",
        )
    if raw.startswith((b"\xfe\xff", b"\xff\xfe")) or b"\x00" in raw[:4]:
        return _invalid("The request body is UTF-16 or UTF-32; send it as UTF-8.", "encoding")
    try:
        text = raw.decode()
    except UnicodeDecodeError as bad:
        return _invalid(
            f"The request body is not valid UTF-8 (byte 0x{raw[bad.start]:02x} at offset "
            f"{bad.start}).",
            "encoding",
        )
    reason = str(error.msg)
    if reason.startswith("depth limit"):
        return _too_deep(max_depth)
    if "surrogate" in reason:
        return _invalid(
            f"The request body is not valid JSON: an escaped UTF-16 surrogate without its pair "
            f"is not Unicode text (at character {error.pos}).",
            "encoding",
        )
    if text.startswith(("NaN", "Infinity", "-Infinity"), error.pos):
        return _invalid(
            f"The request body is not valid JSON: NaN and Infinity are not JSON numbers "
            f"(at character {error.pos}).",
            "syntax",
        )
    if "infinity" in reason:
        return _invalid(
            f"The request body is not valid JSON: a number is too large (at character "
            f"{error.pos}).",
            "syntax",
        )
    return _invalid(f"The request body is not valid JSON ({error}).", "syntax")
