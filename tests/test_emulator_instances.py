"""Minimal instances of JSON Schemas: every one validates against its schema."""

from __future__ import annotations

from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from emulator.instances import minimal_instance


class Leaf(BaseModel):
    name: str = Field(min_length=3, max_length=5)
    size: int = Field(gt=2, le=9)


class Tree(BaseModel):
    label: Literal["oak", "elm"]
    leaves: list[Leaf] = Field(min_length=2)
    parent: Tree | None
    ratio: float = Field(ge=0.5, lt=0.75)
    tags: dict[str, int]


SCHEMAS = [
    {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 7}, "minItems": 2},
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"const": "x"}], "minItems": 2},
    {"type": "array", "contains": {"type": "number", "multipleOf": 0.25, "exclusiveMinimum": 1}},
    {"type": ["null", "integer"], "maximum": -3, "multipleOf": 2},
    {"type": "number", "exclusiveMaximum": -0.5},
    {"type": "string", "format": "date-time"},
    {"type": "string", "format": "uuid"},
    {"type": "string", "pattern": "^[0-9]*$"},
    {"type": "string", "minLength": 40},
    {"enum": [3, "three"]},
    {"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 1}]},
    {
        "allOf": [
            {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
            {"properties": {"y": {"type": "null"}}, "required": ["y"]},
        ]
    },
    {
        "type": "object",
        "additionalProperties": {"type": "string", "maxLength": 2},
        "minProperties": 2,
    },
    {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
        "minProperties": 1,
    },
    Tree.model_json_schema(),
    openai.pydantic_function_tool(Tree)["function"]["parameters"],
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_the_instance_validates(schema):
    instance = minimal_instance(schema, "some echoed text")
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(
        instance
    )


def test_instances_are_minimal_and_carry_the_text():
    assert minimal_instance({"type": "object"}, "hi") == {"echo": "hi"}
    assert minimal_instance({"type": "object", "properties": {"a": {"type": "string"}}}, "hi") == {}
    assert minimal_instance({"type": "string", "maxLength": 4}, "hello") == "hell"
    tree = minimal_instance(Tree.model_json_schema(), "hello world")
    assert tree == {
        "label": "oak",
        "leaves": [{"name": "hello", "size": 3}, {"name": "hello", "size": 3}],
        "parent": None,  # the recursive branch of the union is not taken
        "ratio": 0.5,
        "tags": {},
    }
    assert Tree.model_validate(tree).leaves[0].name == "hello"
