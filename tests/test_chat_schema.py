"""schema/chat_completions.schema.json: the Azure OpenAI chat completions request body.

Plain schema tests (no server): the schema is a valid 2020-12 schema, it accepts the
spec's own examples and realistic bodies, and it rejects bad bodies with an error that
names the offending field (checked on `best_match`, which is what the gateway reports).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource

from gateway.validation import BodyValidator, load_registry

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "schema" / "chat_completions.schema.json"
# The shared spec folder sits beside the repository (as in CI); AZURE_OPENAI_SPEC_DIR overrides.
SPEC_DIR = Path(
    os.environ.get("AZURE_OPENAI_SPEC_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "azure-openai-spec"
)
SPEC_YAML = SPEC_DIR / "2024-10-21-inference.yaml"
EXAMPLES_DIR = SPEC_DIR / "2024-10-21-examples"

needs_spec = pytest.mark.skipif(not SPEC_YAML.exists(), reason=f"spec not found in {SPEC_DIR}")

SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
VALIDATOR = Draft202012Validator(SCHEMA)
# The gateway's fast path (fastjsonschema, messages checked by role) must
# agree with jsonschema on every body these tests try.
FAST = BodyValidator("chat_completions.schema.json", load_registry())


def fast_accepts(body: Any) -> bool:
    return FAST.is_valid(body)


def errors_of(body: Any) -> list[ValidationError]:
    return list(VALIDATOR.iter_errors(body))


def assert_valid(body: Any) -> None:
    errors = errors_of(body)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]
    assert fast_accepts(body)


def best_error(body: Any) -> ValidationError:
    error = best_match(VALIDATOR.iter_errors(body))
    assert error is not None, "body was accepted"
    assert not fast_accepts(body)
    return error


def body(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Hi"}], **fields}


# --------------------------------------------------------------------------- the schema itself


def test_is_a_valid_draft_2020_12_schema():
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["$id"] == "chat_completions.schema.json"
    assert SCHEMA["type"] == "object"
    assert SCHEMA["required"] == ["messages"]
    assert SCHEMA["additionalProperties"] is False


def test_every_field_but_messages_and_model_is_a_ref_to_a_def_of_the_same_name():
    properties = SCHEMA["properties"]
    assert properties["messages"] == {"$ref": "#/$defs/messages"}
    assert properties["model"]["type"] == "string"
    for name, subschema in properties.items():
        if name in ("messages", "model"):
            continue
        assert subschema == {"$ref": f"#/$defs/{name}"}, name
        assert name in SCHEMA["$defs"], name


def test_every_internal_ref_resolves():
    def refs(node: Any):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    for ref in refs(SCHEMA):
        assert ref.startswith("#/$defs/"), ref
        assert ref.removeprefix("#/$defs/") in SCHEMA["$defs"], ref


def test_defs_are_reachable_from_another_schema_through_a_registry():
    """How gpt_chat.schema.json uses them: `chat_completions.schema.json#/$defs/<field>`."""
    other = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "other.schema.json",
        "type": "object",
        "properties": {
            "temperature": {"$ref": "chat_completions.schema.json#/$defs/temperature"},
            "stop": {"$ref": "chat_completions.schema.json#/$defs/stop"},
            # these defs $ref further defs of their own file: must resolve there
            "tools": {"$ref": "chat_completions.schema.json#/$defs/tools"},
            "messages": {"$ref": "chat_completions.schema.json#/$defs/messages"},
        },
        "additionalProperties": False,
    }
    registry = Registry().with_resources(
        [(s["$id"], Resource.from_contents(s)) for s in (SCHEMA, other)]
    )
    validator = Draft202012Validator(other, registry=registry)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    assert not list(
        validator.iter_errors(
            {
                "temperature": 0.5,
                "stop": ["END"],
                "tools": [tool],
                "messages": [{"role": "user", "content": "Hi"}],
            }
        )
    )
    error = best_match(validator.iter_errors({"temperature": 3}))
    assert (list(error.absolute_path), error.validator) == (["temperature"], "maximum")
    error = best_match(validator.iter_errors({"tools": [{"type": "function", "function": {}}]}))
    assert (list(error.absolute_path), error.validator) == (["tools", 0, "function"], "required")
    error = best_match(validator.iter_errors({"messages": [{"role": "tool", "content": "x"}]}))
    assert (list(error.absolute_path), error.validator) == (["messages", 0], "required")


# --------------------------------------------------------------------------- against the spec


def _spec_request_properties() -> dict[str, dict[str, Any]]:
    """createChatCompletionRequest's fields, later allOf members overriding earlier ones."""
    schemas = yaml.safe_load(SPEC_YAML.read_text())["components"]["schemas"]
    merged: dict[str, dict[str, Any]] = {}
    for part in schemas["createChatCompletionRequest"]["allOf"]:
        if "$ref" in part:
            part = schemas[part["$ref"].rsplit("/", 1)[1]]
        for name, prop in part.get("properties", {}).items():
            if "$ref" in prop:
                prop = schemas[prop["$ref"].rsplit("/", 1)[1]]
            merged[name] = prop
    return merged


@needs_spec
def test_every_request_field_of_the_spec_is_accepted():
    spec_fields = set(_spec_request_properties())
    assert "stream_options" in spec_fields  # only in the (newer) YAML revision
    assert spec_fields <= set(SCHEMA["properties"])
    assert set(SCHEMA["properties"]) - spec_fields == {"model"}


@needs_spec
def test_numeric_ranges_match_the_spec():
    spec = _spec_request_properties()
    for name, prop in spec.items():
        if prop.get("type") not in ("number", "integer"):
            continue
        ours = SCHEMA["$defs"][name]
        assert prop["type"] in ours["type"], name
        for bound in ("minimum", "maximum"):
            assert ours.get(bound) == prop.get(bound), (name, bound)


@needs_spec
def test_fields_the_spec_declares_nullable_accept_null():
    for name, prop in _spec_request_properties().items():
        if prop.get("nullable") or prop.get("default", "absent") is None:
            assert_valid(body(**{name: None}))


# --------------------------------------------------------------------------- accepted bodies


def _example_bodies() -> list[tuple[str, dict[str, Any]]]:
    if not EXAMPLES_DIR.exists():
        return []
    return [
        (path.name, json.loads(path.read_text())["parameters"]["body"])
        for path in sorted(EXAMPLES_DIR.glob("chat_completions*.json"))
    ]


@needs_spec
def test_the_spec_has_chat_completion_examples():
    assert len(_example_bodies()) >= 4


@needs_spec
@pytest.mark.parametrize(
    "example", [body for _, body in _example_bodies()], ids=[name for name, _ in _example_bodies()]
)
def test_spec_examples_are_valid(example):
    assert "model" not in example
    assert_valid(example)
    assert_valid({**example, "model": "gpt-4o"})


def test_minimal_body():
    assert_valid({"messages": [{"role": "user", "content": "Hi"}]})


MAXIMAL = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "You are terse.", "name": "rules"},
        {"role": "user", "content": "What is the weather in Paris?", "name": "alice"},
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ],
    "temperature": 0.2,
    "top_p": 0.9,
    "n": 2,
    "stream": True,
    "stream_options": {"include_usage": True},
    "stop": ["\n\n", "END"],
    "max_tokens": 500,
    "max_completion_tokens": 600,
    "presence_penalty": -0.5,
    "frequency_penalty": 1.5,
    "logit_bias": {"50256": -100, "1234": 100, "42": 0},
    "logprobs": True,
    "top_logprobs": 20,
    "user": "user-1234",
    "seed": 42,
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "weather_report-v1",
            "description": "A weather report",
            "schema": {
                "type": "object",
                "properties": {"summary": {"type": "string"}},
                "required": ["summary"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
                "strict": False,
            },
        }
    ],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": False,
    "functions": [
        {
            "name": "legacy_lookup",
            "description": "Deprecated-style function",
            "parameters": {"type": "object", "properties": {}},
        }
    ],
    "function_call": {"name": "legacy_lookup"},
    "data_sources": [
        {
            "type": "azure_search",
            "parameters": {
                "endpoint": "https://search.example.net",
                "index_name": "docs",
                "authentication": {"type": "api_key", "key": "k"},
            },
        }
    ],
}


def test_maximal_body_using_every_field():
    assert set(MAXIMAL) == set(SCHEMA["properties"])
    assert_valid(MAXIMAL)


def test_multi_turn_with_tool_and_function_messages():
    assert_valid(
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be helpful."}]},
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {"name": "w", "arguments": "{}"},
                        },
                        {
                            "id": "b",
                            "type": "function",
                            "function": {"name": "w", "arguments": "{}"},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "a", "content": "21C"},
                {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "25C"}]},
                {"role": "assistant", "content": "Paris 21C, Rome 25C."},
                {"role": "user", "content": "And yesterday?"},
                {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "history", "arguments": '{"day": -1}'},
                },
                {"role": "function", "name": "history", "content": None},
                {"role": "function", "name": "history", "content": "19C"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "See [doc1]."}],
                    "context": {"intent": "weather", "citations": [{"content": "c"}]},
                },
                {
                    "role": "assistant",
                    "content": "x",
                    "refusal": "no",
                    "name": "bot",
                    "function_call": None,
                },
            ],
            "tool_choice": "required",
            "function_call": "auto",
        }
    )


def test_image_parts():
    assert_valid(
        body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare these:"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": "data:image/png;base64,iVBORw0KGgo=",
                                "detail": "high",
                            },
                        },
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://x/b.jpg", "detail": "low"},
                        },
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://x/c.jpg", "detail": "auto"},
                        },
                    ],
                }
            ]
        )
    )


@pytest.mark.parametrize(
    "fields",
    [
        # the nullable fields, null meaning "server default"
        {"temperature": None, "top_p": None, "n": None, "stream": None, "stream_options": None},
        {"stop": None, "max_tokens": None, "max_completion_tokens": None, "seed": None},
        {"presence_penalty": None, "frequency_penalty": None, "logit_bias": None},
        {"logprobs": None, "top_logprobs": None},
        # boundaries
        {"temperature": 0, "top_p": 0, "n": 1, "presence_penalty": -2, "frequency_penalty": -2},
        {"temperature": 2, "top_p": 1, "n": 128, "presence_penalty": 2, "frequency_penalty": 2},
        {"top_logprobs": 0, "logprobs": False, "logit_bias": {}},
        {"seed": -9223372036854775808},
        {"seed": 9223372036854775807},
        {"stop": "END"},
        {"stop": ["a"]},
        {"stop": ["a", "b", "c", "d"]},
        {"stream": False, "stream_options": {}},
        {"response_format": {"type": "text"}},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "A" * 64, "strict": None},
            }
        },
        {"tool_choice": "none"},
        {"tool_choice": "auto"},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tools": []},
        {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(128)]},
        {"functions": [{"name": f"f{i}"} for i in range(128)]},
        {"function_call": "none"},
        {"data_sources": [{"type": "azure_cosmos_db", "parameters": {"anything": {"goes": [1]}}}]},
    ],
    ids=lambda fields: ",".join(fields),
)
def test_accepted_values(fields):
    assert_valid(body(**fields))


# --------------------------------------------------------------------------- rejected bodies


def _with_message(message: dict[str, Any], index: int = 1) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    messages.insert(index, message)
    return {"messages": messages}


REJECTIONS = [
    # (id, body, expected absolute_path, expected validator keyword)
    ("temperature_3", body(temperature=3), ["temperature"], "maximum"),
    ("temperature_negative", body(temperature=-0.1), ["temperature"], "minimum"),
    ("temperature_string", body(temperature="0.5"), ["temperature"], "type"),
    ("top_p_1.5", body(top_p=1.5), ["top_p"], "maximum"),
    ("typo_temprature", body(temprature=0.5), [], "additionalProperties"),
    ("unknown_field", body(prompt="Hi"), [], "additionalProperties"),
    ("no_messages", {"temperature": 1}, [], "required"),
    ("empty_messages", {"messages": []}, ["messages"], "minItems"),
    ("messages_not_array", {"messages": "Hi"}, ["messages"], "type"),
    (
        "tool_message_without_tool_call_id",
        _with_message({"role": "tool", "content": "21C"}, index=3),
        ["messages", 3],
        "required",
    ),
    ("message_without_role", _with_message({"content": "x"}), ["messages", 1], "required"),
    (
        "message_unknown_role",
        _with_message({"role": "developer", "content": "x"}),
        ["messages", 1, "role"],
        "enum",
    ),
    ("message_not_object", _with_message("Hi"), ["messages", 1], "type"),  # type: ignore[arg-type]
    ("user_without_content", _with_message({"role": "user"}), ["messages", 1], "required"),
    (
        "user_content_null",
        _with_message({"role": "user", "content": None}),
        ["messages", 1, "content"],
        "type",
    ),
    (
        "user_content_empty_array",
        _with_message({"role": "user", "content": []}),
        ["messages", 1, "content"],
        "minItems",
    ),
    (
        "user_message_typo_field",
        _with_message({"role": "user", "content": "x", "nmae": "bob"}),
        ["messages", 1],
        "additionalProperties",
    ),
    (
        "user_audio_part",
        _with_message(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "listen"},
                    {"type": "audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                ],
            }
        ),
        ["messages", 1, "content", 1, "type"],
        "enum",
    ),
    (
        "image_part_without_url",
        _with_message(
            {"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}
        ),
        ["messages", 1, "content", 0, "image_url"],
        "required",
    ),
    (
        "image_part_bad_detail",
        _with_message(
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "u", "detail": "ultra"}}],
            }
        ),
        ["messages", 1, "content", 0, "image_url", "detail"],
        "enum",
    ),
    (
        "text_part_without_text",
        _with_message({"role": "user", "content": [{"type": "text"}]}),
        ["messages", 1, "content", 0],
        "required",
    ),
    (
        "system_image_part",
        _with_message(
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
            index=0,
        ),
        ["messages", 0, "content", 0, "type"],
        "enum",
    ),
    (
        "assistant_tool_call_without_id",
        _with_message(
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
            }
        ),
        ["messages", 1, "tool_calls", 0],
        "required",
    ),
    (
        "assistant_tool_call_arguments_object",
        _with_message(
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": {}}}
                ],
            }
        ),
        ["messages", 1, "tool_calls", 0, "function", "arguments"],
        "type",
    ),
    (
        "function_message_without_name",
        _with_message({"role": "function", "content": "x"}),
        ["messages", 1],
        "required",
    ),
    ("logit_bias_200", body(logit_bias={"50256": 200}), ["logit_bias", "50256"], "maximum"),
    ("logit_bias_-101", body(logit_bias={"50256": -101}), ["logit_bias", "50256"], "minimum"),
    ("logit_bias_float", body(logit_bias={"50256": 1.5}), ["logit_bias", "50256"], "type"),
    ("logit_bias_word_key", body(logit_bias={"hello": 1}), ["logit_bias"], "pattern"),
    ("top_logprobs_21", body(logprobs=True, top_logprobs=21), ["top_logprobs"], "maximum"),
    ("stop_array_of_5", body(stop=["a", "b", "c", "d", "e"]), ["stop"], "maxItems"),
    ("stop_empty_array", body(stop=[]), ["stop"], "minItems"),
    ("stop_number", body(stop=5), ["stop"], "type"),
    ("stop_array_of_numbers", body(stop=["a", 1]), ["stop", 1], "type"),
    ("n_0", body(n=0), ["n"], "minimum"),
    ("n_129", body(n=129), ["n"], "maximum"),
    ("n_float", body(n=1.5), ["n"], "type"),
    ("stream_string", body(stream="true"), ["stream"], "type"),
    (
        "stream_options_typo",
        body(stream=True, stream_options={"include_usge": True}),
        ["stream_options"],
        "additionalProperties",
    ),
    ("user_null", body(user=None), ["user"], "type"),
    ("parallel_tool_calls_null", body(parallel_tool_calls=None), ["parallel_tool_calls"], "type"),
    ("seed_too_big", body(seed=2**63), ["seed"], "maximum"),
    (
        "response_format_json_schema_without_name",
        body(
            response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}
        ),
        ["response_format", "json_schema"],
        "required",
    ),
    (
        "response_format_json_schema_without_json_schema",
        body(response_format={"type": "json_schema"}),
        ["response_format"],
        "required",
    ),
    (
        "response_format_bad_name",
        body(response_format={"type": "json_schema", "json_schema": {"name": "my schema"}}),
        ["response_format", "json_schema", "name"],
        "pattern",
    ),
    (
        "response_format_unknown_type",
        body(response_format={"type": "xml"}),
        ["response_format", "type"],
        "enum",
    ),
    ("response_format_string", body(response_format="json_object"), ["response_format"], "type"),
    (
        "tool_without_name",
        body(tools=[{"type": "function", "function": {"description": "d"}}]),
        ["tools", 0, "function"],
        "required",
    ),
    (
        "tool_name_with_space",
        body(tools=[{"type": "function", "function": {"name": "get weather"}}]),
        ["tools", 0, "function", "name"],
        "pattern",
    ),
    (
        "tool_name_65_chars",
        body(tools=[{"type": "function", "function": {"name": "f" * 65}}]),
        ["tools", 0, "function", "name"],
        "pattern",
    ),
    (
        "tool_type_not_function",
        body(tools=[{"type": "retrieval", "function": {"name": "f"}}]),
        ["tools", 0, "type"],
        "const",
    ),
    (
        "tool_parameters_typo",
        body(tools=[{"type": "function", "function": {"name": "f", "paramters": {}}}]),
        ["tools", 0, "function"],
        "additionalProperties",
    ),
    (
        "tools_129",
        body(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]),
        ["tools"],
        "maxItems",
    ),
    ("tool_choice_any", body(tool_choice="any"), ["tool_choice"], "enum"),
    (
        "tool_choice_without_function",
        body(tool_choice={"type": "function"}),
        ["tool_choice"],
        "required",
    ),
    ("functions_empty", body(functions=[]), ["functions"], "minItems"),
    (
        "functions_129",
        body(functions=[{"name": f"f{i}"} for i in range(129)]),
        ["functions"],
        "maxItems",
    ),
    ("function_call_required", body(function_call="required"), ["function_call"], "enum"),
    ("function_call_without_name", body(function_call={}), ["function_call"], "required"),
    (
        "data_source_unknown_type",
        body(data_sources=[{"type": "elasticsearch", "parameters": {}}]),
        ["data_sources", 0, "type"],
        "enum",
    ),
    (
        "data_source_without_parameters",
        body(data_sources=[{"type": "azure_search"}]),
        ["data_sources", 0],
        "required",
    ),
    ("model_not_string", body(model=4), ["model"], "type"),
]


@pytest.mark.parametrize(
    ("request_body", "path", "keyword"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_rejections_name_the_field_and_the_rule(request_body, path, keyword):
    error = best_error(request_body)
    assert (list(error.absolute_path), error.validator) == (path, keyword), error.message


def test_typo_error_names_the_unknown_field():
    error = best_error(body(temprature=0.5))
    assert "temprature" in error.message
    assert "temprature" not in error.schema["properties"]


def test_role_discrimination_gives_no_any_of_noise():
    """Per-role if/then: an error inside a message is never a bare oneOf/anyOf failure."""
    bad = copy.deepcopy(MAXIMAL)
    bad["messages"][3] = {"role": "tool", "content": "x"}
    errors = errors_of(bad)
    assert [(list(e.absolute_path), e.validator) for e in errors] == [(["messages", 3], "required")]
    assert errors[0].message == "'tool_call_id' is a required property"


def test_each_message_kind_rejects_unknown_fields():
    kinds = {
        "system": {"role": "system", "content": "s"},
        "user": {"role": "user", "content": "u"},
        "assistant": {"role": "assistant", "content": "a"},
        "tool": {"role": "tool", "content": "t", "tool_call_id": "c"},
        "function": {"role": "function", "content": "f", "name": "n"},
    }
    for role, message in kinds.items():
        assert_valid({"messages": [message]})
        error = best_error({"messages": [{**message, "extra": 1}]})
        assert (list(error.absolute_path), error.validator) == (
            ["messages", 0],
            "additionalProperties",
        ), role
