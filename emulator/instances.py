"""Minimal instances of JSON Schemas: the emulator's tool arguments and structured answers.

A client that gives a schema (a tool's `parameters`, a `json_schema` response
format) parses the answer against it: `chat.completions.parse` builds a Pydantic
model, instructor and LangChain validate. So the emulator answers the smallest
value the schema accepts, built the same way every time: required properties
only, the first `enum` value, the lowest number in range, the first branch of
an `anyOf`, `minItems` items. Strings carry the echo text (cut or padded to the
length bounds) so a test can see what reached the model, unless a `format` or
`pattern` asks for something else. An object that declares no properties and
allows any is answered `{"echo": text}`, as the emulator answers JSON mode.

Covered: `$ref` into the same document (`$defs`, `definitions`), `allOf`,
`anyOf`/`oneOf`, `const`, `enum`, type lists, numeric bounds and `multipleOf`,
string length, common formats, `items`/`prefixItems`/`contains`,
`additionalProperties`, `minProperties`. Not covered: a `pattern` that neither
the echo text nor the empty string matches, `not`, `if`/`then`, `uniqueItems`
with several items; for those the value may not validate.
"""

from __future__ import annotations

import math
import re
from typing import Any

# Nesting beyond this gets null: a schema that recurses through required fields has no instance.
MAX_DEPTH = 32
FORMATS = {
    "date-time": "1970-01-01T00:00:00Z",
    "date": "1970-01-01",
    "time": "00:00:00Z",
    "duration": "P0D",
    "email": "echo@example.com",
    "idn-email": "echo@example.com",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "uri": "https://example.com/",
    "iri": "https://example.com/",
    "uri-reference": "https://example.com/",
    "iri-reference": "https://example.com/",
    "uri-template": "https://example.com/",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "regex": ".*",
    "json-pointer": "",
}
PADDING = "."


def echo_object(text: str) -> dict[str, str]:
    """The answer to JSON mode, and to a schema that allows any object."""
    return {"echo": text}


def minimal_instance(schema: Any, text: str) -> Any:
    """Return the smallest value `schema` accepts, with `text` in its strings."""
    return Builder(schema, text).build(schema, 0, ())


class Builder:
    """Walks one schema document; `root` is where its `$ref`s point."""

    def __init__(self, root: Any, text: str) -> None:
        self.root = root
        self.text = text

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}  # a reference to another document: nothing to follow offline
        node = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node.get(part, {})
        return node

    def build(self, schema: Any, depth: int, refs: tuple[str, ...]) -> Any:
        if schema is True or schema is None or schema == {}:
            return self.text
        if not isinstance(schema, dict) or depth > MAX_DEPTH:
            return None
        if "$ref" in schema:
            ref = schema["$ref"]
            rest = {key: value for key, value in schema.items() if key != "$ref"}
            target = self.resolve(ref)
            merged = merge(target, rest) if isinstance(target, dict) else target
            return self.build(merged, depth + 1, (*refs, ref))
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][0]
        if "allOf" in schema:
            merged = {key: value for key, value in schema.items() if key != "allOf"}
            for part in schema["allOf"]:
                while isinstance(part, dict) and "$ref" in part:
                    part = merge(
                        self.resolve(part["$ref"]), {k: v for k, v in part.items() if k != "$ref"}
                    )
                merged = merge(merged, part if isinstance(part, dict) else {})
            return self.build(merged, depth + 1, refs)
        for combinator in ("anyOf", "oneOf"):
            if schema.get(combinator):
                rest = {key: value for key, value in schema.items() if key != combinator}
                branch = self.choose(schema[combinator], refs)
                return self.build(
                    merge(rest, branch) if isinstance(branch, dict) else branch, depth + 1, refs
                )
        kind = schema_type(schema)
        if kind == "object":
            return self.object(schema, depth, refs)
        if kind == "array":
            return self.array(schema, depth, refs)
        if kind == "string":
            return self.string(schema)
        if kind in ("integer", "number"):
            return number(schema, integer=kind == "integer")
        if kind == "boolean":
            return False
        if kind == "null":
            return None
        return self.text

    def choose(self, branches: list[Any], refs: tuple[str, ...]) -> Any:
        """The first branch, unless it leads back into a `$ref` being built (a recursive model)."""
        for branch in branches:
            if not (isinstance(branch, dict) and branch.get("$ref") in refs):
                return branch
        return {"type": "null"}

    def object(self, schema: dict, depth: int, refs: tuple[str, ...]) -> dict:
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties", True)
        open_ended = extra is True or extra == {}
        if (
            not properties
            and not schema.get("required")
            and open_ended
            and "patternProperties" not in schema
        ):
            return echo_object(self.text)
        value = {
            name: self.build(properties.get(name, {}), depth + 1, refs)
            for name in schema.get("required", [])
        }
        needed = schema.get("minProperties", 0)
        for name in properties:
            if len(value) >= needed:
                break
            value.setdefault(name, self.build(properties[name], depth + 1, refs))
        index = 0
        while len(value) < needed and extra is not False:
            value.setdefault(
                f"p{index}", self.build(extra if isinstance(extra, dict) else {}, depth + 1, refs)
            )
            index += 1
        return value

    def array(self, schema: dict, depth: int, refs: tuple[str, ...]) -> list:
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", {})
        count = schema.get("minItems", 0)
        if "contains" in schema:
            count = max(count, schema.get("minContains", 1))
            return [self.build(schema["contains"], depth + 1, refs) for _ in range(count)]
        return [
            self.build(prefix[i] if i < len(prefix) else items, depth + 1, refs)
            for i in range(count)
        ]

    def string(self, schema: dict) -> str:
        if schema.get("format") in FORMATS:
            return FORMATS[schema["format"]]
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        value = self.text[:high] if high is not None else self.text
        value += PADDING * max(0, low - len(value))
        pattern = schema.get("pattern")
        if pattern is not None and not re.search(pattern, value) and re.search(pattern, ""):
            return ""
        return value


def schema_type(schema: dict) -> str | None:
    """The type a schema asks for: its `type` (the first non-null of a list), or its keywords'."""
    kind = schema.get("type")
    if isinstance(kind, list):
        return next((name for name in kind if name != "null"), kind[0] if kind else None)
    if kind is not None:
        return kind
    if any(
        key in schema
        for key in ("properties", "required", "additionalProperties", "patternProperties")
    ):
        return "object"
    if any(key in schema for key in ("items", "prefixItems", "contains", "minItems")):
        return "array"
    if any(key in schema for key in ("minLength", "maxLength", "pattern", "format")):
        return "string"
    if any(
        key in schema
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
    ):
        return "number"
    return None


def number(schema: dict, *, integer: bool) -> int | float:
    """The number in range nearest zero (a multiple of `multipleOf` if given)."""
    minimum, maximum = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
    above, below = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    above = above if is_number(above) else -math.inf
    below = below if is_number(below) else math.inf
    step = schema.get("multipleOf") or (1 if integer else None)

    def fits(value: float) -> bool:
        on_step = step is None or math.isclose(value / step, round(value / step))
        return minimum <= value <= maximum and above < value < below and on_step

    if fits(0):
        return 0
    low, high = max(minimum, above), min(maximum, below)
    start = low if low > 0 else high  # 0 failed: the whole range is on one side of it
    if step is not None:
        near = [math.ceil(start / step), math.floor(start / step)]
        candidates = [k * step for base in near for k in (base, base + 1, base - 1)]
    else:
        candidates = [start, start + 1, start - 1, (low + high) / 2]
    value = next((value for value in candidates if fits(value)), start)
    return int(value) if integer and math.isfinite(value) else value


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def merge(base: dict, extra: dict) -> dict:
    """Join two schemas that both apply: properties and `required` combined, else `base` first."""
    joined = dict(extra) | dict(base)
    if "properties" in base or "properties" in extra:
        joined["properties"] = (extra.get("properties") or {}) | (base.get("properties") or {})
    if "required" in base or "required" in extra:
        joined["required"] = list(
            dict.fromkeys([*base.get("required", []), *extra.get("required", [])])
        )
    return joined
