"""Derive the request-body schemas in this folder from OpenAI's published API spec.

    .venv/bin/python schema/derive.py            write the schemas
    .venv/bin/python schema/derive.py --check    exit 1 if a written schema is not what it derives
    .venv/bin/python schema/derive.py --trim SPEC.json
                                                 refresh source/openai-subset.json from a newer spec

The input is `source/openai-subset.json`: the components of OpenAI's OpenAPI document
(openai/openai-openapi, MIT licence in `source/LICENSE`) that the request bodies below reach,
copied unchanged by `--trim`, so a fresh clone derives the same files without the network.
`source/gpt_chat_own.json` holds what only the original `/v1/gpt/chat` contract has.

The pass-through routes forward the caller's body to Azure, which judges it. Their schemas
keep what the gateway relies on and what is certainly wrong, and nothing stricter than Azure:

- Types, numeric ranges, lengths and array sizes of the spec's fields are kept
  (`temperature` 5 is our 400), and so are the fields a shape requires.
- Every object is open: fields the spec does not know pass (Azure adds `data_sources`,
  `user_security_context`, a message's `context`; new ones reach Azure before the spec).
- Every optional field also accepts null (LangChain sends `"model": null`).
- A one-value enum is a tag naming a shape (`"type": "function"`) and is kept; a longer
  enum is a vocabulary that grows and differs between OpenAI and Azure (Azure's
  `prompt_cache_retention` is `in-memory` where OpenAI's is `in_memory`), so only its
  type is kept.
- A union whose members carry distinct tags under one required key (`role`, `type`)
  becomes an `allOf` of `if key == tag then member`, with the tags as the key's enum:
  an error then names the field inside the member instead of "not valid under any of
  the given schemas", and `gateway/validation.py` checks an array of such unions (the
  messages, their content parts, tools) item by item against the member its tag names.
- Other unions become `anyOf` (never `oneOf`, which refuses a value two members accept);
  members of disjoint types merge into one schema (`"type": ["string", "array"]`).
- `format` and every annotation are dropped; `REQUESTS` lists per-schema exceptions, each
  with its reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "source" / "openai-subset.json"
GPT_CHAT_OWN = HERE / "source" / "gpt_chat_own.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
COMPONENT_REF = "#/components/schemas/"

# Keywords that only constrain values of their own type, so that members of disjoint
# types can merge into one schema.
TYPE_SPECIFIC = {
    "array": {"items", "minItems", "maxItems"},
    "object": {"properties", "required", "additionalProperties", "propertyNames"}
    | {"minProperties", "maxProperties"},
    "string": {"minLength", "maxLength", "pattern"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "null": set(),
    "boolean": set(),
}
TYPE_SPECIFIC["integer"] = TYPE_SPECIFIC["number"]
# The only keywords taken over from the spec; the rest are annotations or OpenAPI extensions.
KEPT = {"type", "enum", "const"}.union(*TYPE_SPECIFIC.values())
UNIONS = ("oneOf", "anyOf")
LEFT_TO_AZURE = "Not checked here: Azure judges this value (see schema/derive.py)."


@dataclass(frozen=True)
class RequestSchema:
    """One derived file: the spec component of a request body and the exceptions to the rules."""

    file: str
    title: str
    component: str
    # Fields the spec requires that these routes do not: the deployment comes from the path
    # or from routing, and Azure ignores `model` where the path names the deployment.
    optional: frozenset[str] = frozenset()
    # Components accepted as any value: unions of many shapes that change monthly and that
    # the gateway does not read (Azure's own spec has a different set of tools and items).
    unchecked: frozenset[str] = frozenset()
    # field -> keywords dropped from that field, where Azure's own spec is more lenient.
    relaxed: dict[str, tuple[str, ...]] = field(default_factory=dict)


REQUESTS = (
    RequestSchema(
        "chat_completions.schema.json",
        "POST chat/completions request body (OpenAI, Azure dated and v1 routes)",
        "CreateChatCompletionRequest",
        optional=frozenset({"model"}),
    ),
    RequestSchema(
        "responses.schema.json",
        "POST responses request body (OpenAI and Azure routes)",
        "CreateResponse",
        unchecked=frozenset({"InputItem", "Tool"}),
        # OpenAI's spec says at least 16; Azure's AzureCreateResponse has no lower bound.
        relaxed={"max_output_tokens": ("minimum",)},
    ),
    RequestSchema(
        "embeddings.schema.json",
        "POST embeddings request body (OpenAI, Azure dated and v1 routes)",
        "CreateEmbeddingRequest",
        optional=frozenset({"model"}),
    ),
)


class SpecError(ValueError):
    """The spec has a construct these rules do not cover: derive nothing rather than guess."""


class Deriver:
    """Converts spec components into one schema's `$defs`, each component once."""

    def __init__(self, components: dict[str, Any], request: RequestSchema) -> None:
        self.components = components
        self.request = request
        self.defs: dict[str, Any] = {}
        self.inlined: dict[str, Any] = {}

    def component(self, name: str) -> dict[str, Any]:
        try:
            return self.components[name]
        except KeyError:
            raise SpecError(f"{name} is not in {SOURCE.name}; run --trim again") from None

    def raw(self, node: dict[str, Any]) -> dict[str, Any]:
        """`node` with a `$ref` followed and an `allOf` merged, as the spec wrote it."""
        while "$ref" in node:
            node = self.component(_ref_name(node["$ref"]))
        if "allOf" in node:
            return self.merge_all_of(node)
        return node

    def merge_all_of(self, node: dict[str, Any]) -> dict[str, Any]:
        """The object an `allOf` of objects describes: later members' fields win."""
        properties: dict[str, Any] = {}
        required: list[str] = []
        for member in node["allOf"]:
            member = self.raw(member)
            if set(member) - {"type", "properties", "required", "description", "title"}:
                raise SpecError(f"allOf member with {sorted(member)}")
            properties.update(member.get("properties", {}))
            required += [name for name in member.get("required", ()) if name not in required]
        return {"type": "object", "properties": properties, "required": required}

    def ref(self, name: str) -> dict[str, Any]:
        """A `$ref` to the converted component, or the component itself if it is only keywords."""
        if name in self.inlined:
            return dict(self.inlined[name])
        if name not in self.defs:
            self.defs[name] = {}  # taken before converting, so a cycle ends here
            if name in self.request.unchecked:
                self.defs[name] = {"$comment": LEFT_TO_AZURE}
            else:
                converted = self.convert(self.component(name))
                if _is_flat(converted):
                    del self.defs[name]
                    self.inlined[name] = converted
                    return dict(converted)
                self.defs[name] = converted
        return {"$ref": f"#/$defs/{name}"}

    def nullable(self, schema: dict[str, Any]) -> dict[str, Any]:
        """`schema` that also accepts null.

        An `anyOf` made for the null gets the types of its members beside it, so that a
        value of a wrong type is reported as such rather than as "not valid under any".
        """
        target = (
            self.defs.get(schema["$ref"].removeprefix("#/$defs/")) if "$ref" in schema else None
        )
        if target is not None and (not target or target.get("$comment") == LEFT_TO_AZURE):
            return schema  # already accepts anything
        types = self.types_of(schema)
        if types is not None and "null" in types:
            return schema
        out = nullable_(schema)
        if types is not None and "anyOf" in out and "type" not in out:
            out = {"type": _type_list([*types, "null"]), **out}
        return out

    def types_of(self, schema: dict[str, Any]) -> list[str] | None:
        """The JSON types `schema` accepts, or None if it does not say."""
        if "$ref" in schema:
            return self.types_of(self.defs.get(schema["$ref"].removeprefix("#/$defs/"), {}))
        if "type" in schema:
            return _types(schema)
        if "anyOf" in schema:
            members = [self.types_of(member) for member in schema["anyOf"]]
            if None in members:
                return None
            return list(dict.fromkeys(t for types in members for t in types))
        return None

    def convert(self, node: Any) -> Any:
        if not isinstance(node, dict):
            raise SpecError(f"schema that is not an object: {node!r}")
        nullable = node.get("nullable") is True
        if "$ref" in node:
            converted = self.ref(_ref_name(node["$ref"]))
        elif "$recursiveRef" in node:
            converted = {}
        elif "allOf" in node:
            converted = self.convert(self.merge_all_of(node))
        elif any(key in node for key in UNIONS):
            if set(node) & KEPT - {"type"}:
                raise SpecError(f"union with sibling keywords {sorted(set(node) & KEPT)}")
            (key,) = (key for key in UNIONS if key in node)
            converted = self.union(node[key])
        else:
            converted = self.plain(node)
        return self.nullable(converted) if nullable else converted

    def plain(self, node: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key not in KEPT:
                continue
            if key == "properties":
                required = set(node.get("required", ()))
                out[key] = {
                    name: self.convert(prop)
                    if name in required
                    else self.nullable(self.convert(prop))
                    for name, prop in value.items()
                }
            elif key in ("items", "propertyNames"):
                out[key] = self.convert(value)
            elif key == "required":
                if value:
                    out[key] = value
            elif key == "additionalProperties":
                if isinstance(value, dict) and value:
                    out[key] = self.convert(value)
            elif key == "const":
                out["enum"] = [value]
            elif key == "enum":
                if len(set(map(json.dumps, value))) == 1:
                    out["enum"] = [value[0]]
                elif "type" not in node:
                    out["type"] = _type_of_values(value)
            else:
                out[key] = value
        return out

    def union(self, members: list[dict[str, Any]]) -> dict[str, Any]:
        has_null = any(map(_is_null, members))
        members = [member for member in members if not _is_null(member)]
        objects = [member for member in members if self.raw(member).get("type") == "object"]
        tagged = self.tagged_union(objects) if len(objects) > 1 or objects == members else None
        converted: list[dict[str, Any]] = []
        for member in members:
            # the tagged members as one schema, where the first of them was
            member = tagged if tagged is not None and member in objects else self.convert(member)
            if member not in converted:
                converted.append(member)
        merged = _merge_disjoint(converted)
        types = self.types_of(merged)
        if "anyOf" in merged and types is not None:
            merged = {"type": _type_list(types), **merged}
        return self.nullable(merged) if has_null else merged

    def tagged_union(self, members: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The if/then form of a union whose members each require a distinct one-value tag."""
        candidates: set[str] | None = None
        raws = [self.raw(member) for member in members]
        for raw in raws:
            tags = {
                name
                for name, prop in raw.get("properties", {}).items()
                if name in raw.get("required", ()) and _tag(self.raw(prop)) is not None
            }
            candidates = tags if candidates is None else candidates & tags
        if not candidates:
            return None
        key = next((k for k in ("role", "type") if k in candidates), min(candidates))
        values = [_tag(self.raw(raw["properties"][key])) for raw in raws]
        if len(set(values)) != len(values):
            return None
        return {
            "type": "object",
            "required": [key],
            "properties": {key: {"enum": values}},
            "allOf": [
                {
                    "if": {"properties": {key: {"const": value}}, "required": [key]},
                    "then": self.convert(member),
                }
                for value, member in zip(values, members, strict=True)
            ],
        }


def _ref_name(ref: str) -> str:
    if not ref.startswith(COMPONENT_REF):
        raise SpecError(f"$ref outside components/schemas: {ref}")
    return ref.removeprefix(COMPONENT_REF)


def _is_null(member: dict[str, Any]) -> bool:
    return member.get("type") == "null" and not set(member) & KEPT - {"type"}


def _tag(prop: dict[str, Any]) -> Any:
    if "const" in prop:
        return prop["const"]
    enum = prop.get("enum")
    return enum[0] if isinstance(enum, list) and len(enum) == 1 else None


def _type_of_values(values: list[Any]) -> str | list[str]:
    names = {"str": "string", "bool": "boolean", "int": "integer", "float": "number"}
    types = sorted({names[type(v).__name__] for v in values if v is not None})
    return types[0] if len(types) == 1 else types


def _types(schema: dict[str, Any]) -> list[str]:
    value = schema.get("type", [])
    return [value] if isinstance(value, str) else list(value)


def _family(name: str) -> str:
    return "number" if name == "integer" else name


def _merge_disjoint(members: list[dict[str, Any]]) -> dict[str, Any]:
    """Members of disjoint types, whose keywords only apply to their own types, as one schema."""
    groups: list[dict[str, Any]] = []
    for member in members:
        types = _types(member)
        mergeable = bool(types) and set(member) - {"type"} <= set().union(
            *(TYPE_SPECIFIC[t] for t in types)
        )
        for group in groups:
            if not mergeable or not group.get("type"):
                continue
            taken = {_family(t) for t in _types(group)}
            if taken & {_family(t) for t in types} or set(group) & set(member) - {"type"}:
                continue
            group.update({k: v for k, v in member.items() if k != "type"})
            group["type"] = _type_list(_types(group) + types)
            break
        else:
            groups.append(dict(member) if mergeable else member)
    return groups[0] if len(groups) == 1 else {"anyOf": groups}


def _type_list(types: list[str]) -> str | list[str]:
    """One name, or the names with null last."""
    ordered = [t for t in types if t != "null"] + ["null"] * ("null" in types)
    return ordered[0] if len(ordered) == 1 else ordered


def _is_flat(schema: dict[str, Any]) -> bool:
    """Only keyword values, no subschemas: cheaper inlined than referred to."""
    nested = {"properties", "items", "additionalProperties", "propertyNames", "anyOf", "allOf"}
    return "type" in schema and not set(schema) & nested


def nullable_(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` that also accepts null."""
    if not schema or schema.get("$comment") == LEFT_TO_AZURE:
        return schema
    if "anyOf" in schema and set(schema) <= {"anyOf", "type"}:
        members = schema["anyOf"]
        if any("null" in _types(member) for member in members):
            return schema
        for i, member in enumerate(members):
            if "type" in member and not set(member) & {"allOf", "enum"}:
                return {"anyOf": [*members[:i], nullable_(member), *members[i + 1 :]]}
        return {"anyOf": [*members, {"type": "null"}]}
    if "type" not in schema or "allOf" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    types = _types(schema)
    if "null" in types:
        return schema
    out = {**schema, "type": _type_list([*types, "null"])}
    if "enum" in schema:
        out["enum"] = [*schema["enum"], None]
    return out


def derive_request(spec: dict[str, Any], request: RequestSchema) -> dict[str, Any]:
    """One request schema: its fields as `$defs/<field>` (so other schemas can `$ref` them)."""
    deriver = Deriver(spec["components"]["schemas"], request)
    body = deriver.raw(deriver.component(request.component))
    required = [name for name in body.get("required", ()) if name not in request.optional]
    fields: dict[str, Any] = {}
    for name, prop in body["properties"].items():
        converted = deriver.convert(prop)
        converted = converted if name in required else deriver.nullable(converted)
        for keyword in request.relaxed.get(name, ()):
            converted = {k: v for k, v in converted.items() if k != keyword}
        fields[name] = converted
    clash = set(fields) & set(deriver.defs)
    if clash:
        raise SpecError(f"field names that are also component names: {sorted(clash)}")
    return {
        "$schema": DRAFT,
        "$id": request.file,
        "title": request.title,
        "description": (
            f"Generated by schema/derive.py from {request.component} of OpenAI's API spec "
            f"{spec['info']['version']} (schema/source/openai-subset.json); do not edit. "
            "Known fields are checked for type and range; unknown fields pass to Azure."
        ),
        "type": "object",
        "required": required,
        "properties": {name: {"$ref": f"#/$defs/{name}"} for name in fields},
        "$defs": {**fields, **deriver.defs},
    }


def derive_gpt_chat(chat: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The original contract: its own fields, then every chat field by reference; no others."""
    properties = dict(own["properties"])
    for name in chat["properties"]:
        properties.setdefault(name, {"$ref": f"{chat['$id']}#/$defs/{name}"})
    return {
        "$schema": DRAFT,
        "$id": "gpt_chat.schema.json",
        **{key: value for key, value in own.items() if key != "properties"},
        "properties": properties,
        "additionalProperties": False,
    }


def derive_all(spec: dict[str, Any], own: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """File name -> schema, for every file this script writes, each a valid 2020-12 schema.

    The gateway does not check them against the metaschema at start-up: this does.
    """
    schemas = {request.file: derive_request(spec, request) for request in REQUESTS}
    schemas["gpt_chat.schema.json"] = derive_gpt_chat(schemas["chat_completions.schema.json"], own)
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)
    return schemas


def dump(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def trim(full: dict[str, Any]) -> dict[str, Any]:
    """The components of `full` that REQUESTS reach, without the ones they leave unchecked."""
    components = full["components"]["schemas"]
    kept: dict[str, Any] = {}
    for request in REQUESTS:
        queue = [request.component]
        while queue:
            name = queue.pop(0)
            if name in kept or name in request.unchecked:
                continue
            kept[name] = components[name]
            queue += [_ref_name(ref) for ref in _refs(components[name])]
    return {
        "openapi": full["openapi"],
        "info": full["info"],
        "x-source": {
            "description": "Components of openai/openai-openapi's openapi.json that "
            "schema/derive.py reads, unchanged; made by `schema/derive.py --trim`.",
            "from": full.get("x-subset", {}),
        },
        "components": {"schemas": dict(sorted(kept.items()))},
    }


def _refs(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--trim", metavar="SPEC.json", type=Path, help="refresh the source")
    args = parser.parse_args(argv)
    if args.trim:
        SOURCE.write_text(dump(trim(json.loads(args.trim.read_text()))))
    spec = json.loads(SOURCE.read_text())
    derived = derive_all(spec, json.loads(GPT_CHAT_OWN.read_text()))
    stale = []
    for name, schema in derived.items():
        path = HERE / name
        text = dump(schema)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"not as derived (run schema/derive.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
