"""Request bodies checked against the JSON Schema files in `schema/`.

Validators are compiled once, at start-up. A failure becomes a 400 whose
message names the field path and the rule, without echoing the (possibly
large) offending value back in full.

Two validators per body schema: fastjsonschema (generated code) decides
whether a body is valid, and jsonschema, which knows the most relevant
error, describes the ones that are not. A body the fast one refuses is
always re-checked by jsonschema, so the two can never disagree to a
caller's cost.

The generated code evaluates an `if` by raising and catching an exception,
so a message checked against the six role branches of the chat schema
costs one exception per branch it is not. The fast path therefore checks an
array whose items are such a union (`messages`, a message's `content`
parts, `tools`) in two steps: the object without the branches, then each
item against the one branch its discriminator (`role`, `type`) selects,
whose own arrays of unions are checked the same way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource

from gateway.errors import GatewayError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"
_MAX_SHOWN_VALUE = 60


def load_registry(schema_dir: Path = SCHEMA_DIR) -> Registry:
    """Every schema file, addressable by its `$id` so schemas can `$ref` one another."""
    resources = []
    for path in sorted(schema_dir.glob("*.schema.json")):
        contents = json.loads(path.read_text())
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


def compile_validator(schema_id: str, registry: Registry) -> Draft202012Validator:
    schema = registry.contents(schema_id)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=registry)


def bundle(schema_id: str, registry: Registry) -> dict[str, Any]:
    """The schema with every `$ref` replaced by what it points to, as one draft-07 document.

    Our schemas have no cycles, so inlining ends; `$defs` is dropped once
    nothing refers to it.
    """
    resolver = registry.resolver(schema_id)

    def inline(node: Any, resolver: Any) -> Any:
        if isinstance(node, list):
            return [inline(item, resolver) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            resolved = resolver.lookup(node["$ref"])
            return inline(copy.deepcopy(resolved.contents), resolved.resolver)
        return {k: inline(v, resolver) for k, v in node.items() if k not in ("$defs", "$id")}

    bundled = inline(registry.contents(schema_id), resolver)
    bundled["$schema"] = "http://json-schema.org/draft-07/schema#"
    return bundled


def discriminated_union(node: dict[str, Any]) -> tuple[str, dict[Any, dict[str, Any]]] | None:
    """(key, {value: schema}) when `node`'s allOf is only `if key == value then schema` entries."""
    entries = node.get("allOf")
    if not entries:
        return None
    branches: dict[Any, dict[str, Any]] = {}
    keys = set()
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"if", "then"}:
            return None
        condition = entry["if"]
        properties = condition.get("properties", {})
        if set(condition) != {"properties", "required"} or len(properties) != 1:
            return None
        ((key, rule),) = properties.items()
        if condition["required"] != [key] or set(rule) != {"const"}:
            return None
        keys.add(key)
        branches[rule["const"]] = entry["then"]
    return (keys.pop(), branches) if len(keys) == 1 else None


def _fast_check(schema: dict[str, Any]) -> Callable[[Any], Any]:
    # `const` as a one-value `enum`: the same rule, and fastjsonschema cannot
    # generate `const` without detailed exceptions (which only this path skips).
    def const_as_enum(node: Any) -> Any:
        if isinstance(node, list):
            return [const_as_enum(item) for item in node]
        if isinstance(node, dict):
            return {
                "enum" if key == "const" else key: [value]
                if key == "const"
                else const_as_enum(value)
                for key, value in node.items()
            }
        return node

    draft = {"$schema": "http://json-schema.org/draft-07/schema#", **const_as_enum(schema)}
    return fastjsonschema.compile(draft, detailed_exceptions=False)


def _array_items(rule: Any) -> Any:
    """The `items` of an array field's rule, also when the rule is `anyOf [array, null]`."""
    if not isinstance(rule, dict):
        return None
    members = rule.get("anyOf") or ()
    if set(rule) <= {"anyOf", "type"} and len(members) == 2 and {"type": "null"} in members:
        rule = next(member for member in members if member != {"type": "null"})
    return rule.get("items")


class _FastCheck:
    """One object schema, its arrays of discriminated unions checked item by item by tag."""

    def __init__(self, schema: dict[str, Any]) -> None:
        schema = copy.deepcopy(schema)
        # field -> (key, {value: check of that branch})
        self.unions: list[tuple[str, str, dict[Any, Callable[[Any], Any]]]] = []
        for field, rule in schema.get("properties", {}).items():
            items = _array_items(rule)
            union = discriminated_union(items) if isinstance(items, dict) else None
            if union is not None:
                key, branches = union
                del items["allOf"]  # the item's own rules (type, required, the key's enum) stay
                checks = {value: _FastCheck(then).simplest() for value, then in branches.items()}
                self.unions.append((field, key, checks))
        self.check = _fast_check(schema)

    def simplest(self) -> Callable[[Any], Any]:
        """This check, or the generated function alone when there is no union to dispatch."""
        return self if self.unions else self.check

    def __call__(self, data: Any) -> None:
        self.check(data)
        if not self.unions or not isinstance(data, dict):
            return
        for field, key, branches in self.unions:
            items = data.get(field)
            if type(items) is list:
                for item in items:
                    # `self.check` has made each item an object whose key is one of the tags
                    branch = branches.get(item.get(key))
                    if branch is not None:
                        branch(item)


class BodyValidator:
    """Checks request bodies against one schema; see the module docstring."""

    def __init__(self, schema_id: str, registry: Registry) -> None:
        # Not checked against the metaschema here (~150 ms for the chat schema, at every
        # start): schema/derive.py checks the request schemas it writes, and a test keeps
        # the files equal to what it writes.
        self.describer = Draft202012Validator(registry.contents(schema_id), registry=registry)
        self._check_body = _FastCheck(bundle(schema_id, registry))

    def is_valid(self, body: Any) -> bool:
        try:
            self._check_body(body)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    def validate(self, body: Any) -> None:
        """Raise a 400 GatewayError describing the most relevant schema violation."""
        if self.is_valid(body):
            return
        error = best_match(self.describer.iter_errors(body))
        if error is None:
            return
        param, rule, predicate = describe(error)
        where = field_path(error.absolute_path) or "the body"
        raise GatewayError(
            400,
            "invalid_request",
            f"Invalid request body: {where} {predicate}",
            param=param or None,
            rule=rule,
        )


def field_path(parts: Iterable[Any]) -> str:
    """`messages[2].content` style path of a value inside the body."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value: Any) -> str:
    """`value` as JSON, cut short: the error names it, it does not echo it."""
    try:
        text = orjson.dumps(value)[: _MAX_SHOWN_VALUE + 1].decode(errors="ignore")
    except orjson.JSONEncodeError:  # nested past orjson's limit: say what it is
        text = type(value).__name__
    return text if len(text) <= _MAX_SHOWN_VALUE else text[: _MAX_SHOWN_VALUE - 3] + "..."


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN_VALUE else text[: _MAX_SHOWN_VALUE - 3] + "..."


def _types(value: Any) -> str:
    return " or ".join(value) if isinstance(value, list) else str(value)


def _values(value: Any) -> str:
    return ", ".join(_shown(item) for item in value) if isinstance(value, list) else _shown(value)


def _min_length(value: Any) -> str:
    return "must not be empty" if value == 1 else f"must have at least {value} characters"


# What each keyword's failure says, built from the keyword's value only when
# that keyword failed.
_PREDICATES: dict[str, Callable[[Any], str]] = {
    "minimum": lambda limit: f"must be >= {limit}",
    "maximum": lambda limit: f"must be <= {limit}",
    "exclusiveMinimum": lambda limit: f"must be > {limit}",
    "exclusiveMaximum": lambda limit: f"must be < {limit}",
    "multipleOf": lambda limit: f"must be a multiple of {limit}",
    "minLength": _min_length,
    "maxLength": lambda limit: f"must have at most {limit} characters",
    "minItems": lambda limit: f"must have at least {limit} item(s)",
    "maxItems": lambda limit: f"must have at most {limit} item(s)",
    "uniqueItems": lambda limit: "must not repeat an item",
    "minProperties": lambda limit: f"must have at least {limit} field(s)",
    "maxProperties": lambda limit: f"must have at most {limit} field(s)",
    "type": lambda limit: f"must be of type {_types(limit)}",
    "enum": lambda limit: f"must be one of {_values(limit)}",
    "const": lambda limit: f"must be {_shown(limit)}",
    "pattern": lambda limit: f"must match the pattern {limit}",
    "format": lambda limit: f"must be a valid {limit}",
    "not": lambda limit: "must not match the schema it is excluded by",
    "anyOf": lambda alternatives: _one_of_forms(alternatives),
    "oneOf": lambda alternatives: _one_of_forms(alternatives),
}


def _one_of_forms(alternatives: Any) -> str:
    """For an anyOf/oneOf that no branch's type admits: the types the branches allow."""
    if isinstance(alternatives, list) and all(
        isinstance(sub, dict) and "type" in sub for sub in alternatives
    ):
        allowed: list[str] = []
        for sub in alternatives:
            for name in sub["type"] if isinstance(sub["type"], list) else [sub["type"]]:
                if name not in allowed:
                    allowed.append(name)
        return f"must be of type {' or '.join(allowed)}"
    count = len(alternatives) if isinstance(alternatives, list) else 0
    return f"must match one of the {count} allowed forms"


def describe(error: ValidationError) -> tuple[str, str, str]:
    """(field path, rule keyword, predicate) for one error: ("temperature", "maximum", "must be <= 2 (got 3)").

    Only the failing keyword is described; any keyword a schema can use gets
    an answer (a generic one for those this module has no words for).
    """
    path = field_path(error.absolute_path)
    rule = str(error.validator)
    limit = error.validator_value
    if rule == "additionalProperties" and isinstance(error.instance, dict):
        allowed = error.schema.get("properties", {})
        unknown = sorted(name for name in error.instance if name not in allowed)
        if unknown:
            names = ", ".join(repr(_cut(name)) for name in unknown[:5])
            return (
                field_path([*error.absolute_path, _cut(unknown[0])]),
                rule,
                f"has unknown field {names} (check the spelling)",
            )
    if rule == "required" and isinstance(error.instance, dict) and isinstance(limit, list):
        missing = [name for name in limit if name not in error.instance]
        if missing:
            return (
                field_path([*error.absolute_path, missing[0]]),
                rule,
                f"is missing the required field {missing[0]!r}",
            )
    if rule in ("anyOf", "oneOf") and _alternatives_are_required(limit):
        alternatives = [sub["required"][0] for sub in limit]
        return path, "required", f"needs one of the fields {', '.join(map(repr, alternatives))}"
    if rule == "oneOf" and _matches_several(error):
        shown = _shown(error.instance)
        return path, rule, f"matches more than one of the allowed forms (got {shown})"
    words = _PREDICATES.get(rule)
    predicate = words(limit) if words else f"fails the rule {rule!r}"
    if "propertyNames" in error.schema_path:
        predicate = f"has a field name that {predicate}"
    return path, rule, f"{predicate} (got {_shown(error.instance)})"


def _alternatives_are_required(alternatives: Any) -> bool:
    return isinstance(alternatives, list) and all(
        isinstance(sub, dict)
        and set(sub) == {"required"}
        and isinstance(sub["required"], list)
        and len(sub["required"]) == 1
        for sub in alternatives
    )


def _matches_several(error: ValidationError) -> bool:
    # jsonschema reports a oneOf that several branches accept without sub-errors.
    return not error.context
