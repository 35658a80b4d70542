"""schema/chat_completions.schema.json: the chat completions request body of the pass-through routes.

Plain schema tests (no server): the schema is a valid 2020-12 schema, it accepts the
dated Azure spec's examples and bodies of current models (every role and content part,
null for optional fields, fields it does not know), and it rejects certainly wrong
bodies with an error that names the offending field (checked on `best_match`, which
is what the gateway reports). Every body is also checked by the gateway's fast path,
which must agree with jsonschema.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource

from gateway.validation import BodyValidator, load_registry

from .support.schemas import subschemas

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "schema" / "chat_completions.schema.json"
# The official spec and its examples, kept in the repository (tests/spec/.../SOURCE.md).
SPEC_DIR = ROOT / "tests" / "spec" / "azure-openai-2024-10-21"
SPEC_YAML = SPEC_DIR / "inference.yaml"
EXAMPLES_DIR = SPEC_DIR / "examples"

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


def test_no_object_refuses_unknown_fields():
    assert all(sub.get("additionalProperties") is not False for sub in subschemas(SCHEMA))


def test_every_field_is_a_ref_to_a_def_of_the_same_name():
    for name, subschema in SCHEMA["properties"].items():
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


def test_every_request_field_of_the_dated_spec_is_known_but_azure_s_own():
    spec_fields = set(_spec_request_properties())
    assert "stream_options" in spec_fields  # only in the (newer) YAML revision
    # Azure's On Your Data extension is not in OpenAI's spec: it passes as an unknown field.
    assert spec_fields - set(SCHEMA["properties"]) == {"data_sources"}
    assert_valid(body(data_sources=[{"type": "azure_search", "parameters": {}}]))


def test_numeric_ranges_are_no_stricter_than_the_dated_spec():
    spec = _spec_request_properties()
    for name, prop in spec.items():
        if prop.get("type") not in ("number", "integer") or name not in SCHEMA["$defs"]:
            continue
        ours = SCHEMA["$defs"][name]
        assert prop["type"] in ours["type"], name
        if "minimum" in ours:
            assert ours["minimum"] <= prop["minimum"], name
        if "maximum" in ours:
            assert ours["maximum"] >= prop["maximum"], name


def test_fields_the_spec_declares_nullable_accept_null():
    for name, prop in _spec_request_properties().items():
        if prop.get("nullable") or prop.get("default", "absent") is None:
            assert_valid(body(**{name: None}))


# --------------------------------------------------------------------------- accepted bodies


def _example_bodies() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, json.loads(path.read_text())["parameters"]["body"])
        for path in sorted(EXAMPLES_DIR.glob("chat_completions*.json"))
    ]


def test_the_spec_has_chat_completion_examples():
    assert len(_example_bodies()) >= 4


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


def test_maximal_body_of_the_dated_api():
    assert set(MAXIMAL) - set(SCHEMA["properties"]) == {"data_sources"}
    assert_valid(MAXIMAL)


CURRENT = {
    "model": None,
    "messages": [
        {"role": "developer", "content": "Answer in one word.", "name": None},
        {"role": "developer", "content": [{"type": "text", "text": "Be exact."}]},
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "What is on these?",
                    "prompt_cache_breakpoint": {"mode": "explicit"},
                },
                {
                    "type": "image_url",
                    "image_url": {
                        "url": "data:image/png;base64,iVBORw0KGgo=",
                        "detail": "original",
                    },
                },
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "file", "file": {"file_id": "file-abc", "filename": None}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "audio": {"id": "audio_1"},
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}},
                {"id": "c2", "type": "custom", "custom": {"name": "sql", "input": "select 1"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "found"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "1"}]},
    ],
    "metadata": {"session": "s-1"},
    "top_logprobs": None,
    "temperature": None,
    "top_p": None,
    "user": None,
    "safety_identifier": "user-hash-1",
    "prompt_cache_key": "tenant-7",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"ttl": "30m"},
    "service_tier": "priority",
    "modalities": ["text", "audio"],
    "verbosity": "low",
    "reasoning_effort": "high",
    "max_completion_tokens": 4000,
    "frequency_penalty": None,
    "presence_penalty": None,
    "web_search_options": {"search_context_size": "medium", "user_location": None},
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}},
    },
    "audio": {"voice": "alloy", "format": "mp3"},
    "store": True,
    "moderation": None,
    "stream": True,
    "stop": None,
    "logit_bias": None,
    "logprobs": False,
    "max_tokens": None,
    "n": 1,
    "prediction": {"type": "content", "content": "the previous draft"},
    "seed": None,
    "stream_options": {"include_usage": True, "include_obfuscation": False},
    "tools": [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object"}, "strict": True},
        },
        {
            "type": "custom",
            "custom": {
                "name": "sql",
                "format": {
                    "type": "grammar",
                    "grammar": {"definition": "start: 'x'", "syntax": "lark"},
                },
            },
        },
    ],
    "tool_choice": {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "auto",
            "tools": [{"type": "function", "function": {"name": "lookup"}}],
        },
    },
    "parallel_tool_calls": None,
    "function_call": None,
    "functions": None,
}


def test_current_body_using_every_field():
    assert set(CURRENT) == set(SCHEMA["properties"])
    assert_valid(CURRENT)


# What LangChain, the AI SDK, the openai SDKs and litellm send for current models.
CURRENT_MODEL_BODIES = {
    "langchain_azure_reasoning": {
        "model": None,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "stream": False,
        "reasoning_effort": "medium",
        "max_completion_tokens": 1000,
        "user": None,
    },
    "structured_output_parse": {
        "model": "gpt-5",
        "messages": [{"role": "user", "content": "Extract"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "Person",
                "strict": True,
                "schema": {"type": "object", "properties": {}},
            },
        },
    },
    "forced_tool_with_strict_schema": {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [
            {
                "type": "function",
                "function": {"name": "weather", "strict": True, "parameters": {"type": "object"}},
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "parallel_tool_calls": False,
    },
    "audio_out": {
        "model": "gpt-4o-audio-preview",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": "AA==", "format": "mp3"}}
                ],
            }
        ],
        "modalities": ["text", "audio"],
        "audio": {"voice": {"id": "voice_1234"}, "format": "pcm16"},
    },
    "predicted_output": {
        "model": "gpt-4.1-mini",
        "messages": [{"role": "user", "content": "Rename x to y"}],
        "prediction": {"type": "content", "content": [{"type": "text", "text": "def f(x): ..."}]},
    },
    "azure_extensions": {
        "messages": [
            {"role": "user", "content": "Ask the docs"},
            {
                "role": "assistant",
                "content": "See [doc1].",
                "context": {"citations": [{"content": "c"}]},
            },
            {"role": "user", "content": "More"},
        ],
        "data_sources": [
            {"type": "azure_search", "parameters": {"endpoint": "https://s", "index_name": "i"}}
        ],
        "user_security_context": {"application_name": "app", "end_user_id": "u"},
    },
}


@pytest.mark.parametrize("request_body", CURRENT_MODEL_BODIES.values(), ids=CURRENT_MODEL_BODIES)
def test_bodies_of_current_models(request_body):
    assert_valid(request_body)


@pytest.mark.parametrize("request_body", CURRENT_MODEL_BODIES.values(), ids=CURRENT_MODEL_BODIES)
def test_the_fast_path_agrees_on_bodies_of_current_models_made_wrong(request_body):
    """One certainly wrong value in each body: both validators refuse it, at the same place."""
    wrong = copy.deepcopy(request_body)
    wrong["messages"][-1]["content"] = 7
    error = best_error(wrong)
    assert list(error.absolute_path) == ["messages", len(wrong["messages"]) - 1, "content"]
    wrong = {**request_body, "temperature": 5}
    assert (list(best_error(wrong).absolute_path), best_error(wrong).validator) == (
        ["temperature"],
        "maximum",
    )


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
        # null wherever a field is optional (LangChain's AzureChatOpenAI sends model and user as null)
        {"model": None, "user": None, "parallel_tool_calls": None, "metadata": None, "store": None},
        {"reasoning_effort": None, "service_tier": None, "prediction": None, "modalities": None},
        {"response_format": None, "tools": None, "tool_choice": None, "function_call": None},
        # fields the spec does not know go to Azure, which judges them
        {"temprature": 0.5},
        {"some_future_field": {"nested": [1, 2]}},
        {"stream": True, "stream_options": {"include_usge": True}},
        # vocabularies (enums of more than one value) are Azure's to judge: they grow and differ
        {"reasoning_effort": "minimal"},
        {"reasoning_effort": "a-future-effort"},
        {"service_tier": "flex"},
        {"prompt_cache_retention": "in-memory"},
        {"tool_choice": "any"},
        {"function_call": "required"},
        {"verbosity": "high"},
        # the current spec states no range for these
        {"logit_bias": {"50256": 200}},
        {"logit_bias": {"hello": 1}},
        {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
        {"tools": [{"type": "function", "function": {"name": "get weather", "paramters": {}}}]},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "my schema"}}},
        {"seed": 2**63},
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
        _with_message({"role": "robot", "content": "x"}),
        ["messages", 1, "role"],
        "enum",
    ),
    (
        "developer_without_content",
        _with_message({"role": "developer"}, index=0),
        ["messages", 0],
        "required",
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
    ("logit_bias_float", body(logit_bias={"50256": 1.5}), ["logit_bias", "50256"], "type"),
    ("top_logprobs_21", body(logprobs=True, top_logprobs=21), ["top_logprobs"], "maximum"),
    ("stop_array_of_5", body(stop=["a", "b", "c", "d", "e"]), ["stop"], "maxItems"),
    ("stop_empty_array", body(stop=[]), ["stop"], "minItems"),
    ("stop_number", body(stop=5), ["stop"], "type"),
    ("stop_array_of_numbers", body(stop=["a", 1]), ["stop", 1], "type"),
    ("n_0", body(n=0), ["n"], "minimum"),
    ("n_129", body(n=129), ["n"], "maximum"),
    ("n_float", body(n=1.5), ["n"], "type"),
    ("stream_string", body(stream="true"), ["stream"], "type"),
    ("seed_too_big", body(seed=2**64), ["seed"], "maximum"),
    ("model_object", body(model={"name": "gpt-4o"}), ["model"], "type"),
    ("reasoning_effort_number", body(reasoning_effort=1), ["reasoning_effort"], "type"),
    ("store_string", body(store="yes"), ["store"], "type"),
    ("metadata_number_value", body(metadata={"k": 1}), ["metadata", "k"], "type"),
    ("modalities_string", body(modalities="text"), ["modalities"], "type"),
    (
        "prediction_without_content",
        body(prediction={"type": "content"}),
        ["prediction"],
        "required",
    ),
    (
        "prediction_unknown_type",
        body(prediction={"type": "diff", "content": "x"}),
        ["prediction", "type"],
        "enum",
    ),
    ("prompt_cache_key_number", body(prompt_cache_key=5), ["prompt_cache_key"], "type"),
    (
        "safety_identifier_65_chars",
        body(safety_identifier="u" * 65),
        ["safety_identifier"],
        "maxLength",
    ),
    ("service_tier_number", body(service_tier=1), ["service_tier"], "type"),
    (
        "max_completion_tokens_float",
        body(max_completion_tokens=1.5),
        ["max_completion_tokens"],
        "type",
    ),
    (
        "custom_tool_call_without_input",
        _with_message(
            {
                "role": "assistant",
                "tool_calls": [{"id": "a", "type": "custom", "custom": {"name": "sql"}}],
            }
        ),
        ["messages", 1, "tool_calls", 0, "custom"],
        "required",
    ),
    (
        "audio_part_without_format",
        _with_message(
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA=="}}]}
        ),
        ["messages", 1, "content", 0, "input_audio"],
        "required",
    ),
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
        "tool_type_not_function",
        body(tools=[{"type": "retrieval", "function": {"name": "f"}}]),
        ["tools", 0, "type"],
        "enum",
    ),
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
    ("function_call_without_name", body(function_call={}), ["function_call"], "required"),
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


def test_wrong_types_are_named_as_such_not_as_a_failed_any_of():
    """A nullable union says which types it takes, so the error is a type error."""
    for field, value in (
        ("response_format", "json_object"),
        ("tool_choice", 3),
        ("prediction", "x"),
    ):
        error = best_error(body(**{field: value}))
        assert (list(error.absolute_path), error.validator) == ([field], "type"), field


def test_role_discrimination_gives_no_any_of_noise():
    """Per-role if/then: an error inside a message is never a bare oneOf/anyOf failure."""
    bad = copy.deepcopy(MAXIMAL)
    bad["messages"][3] = {"role": "tool", "content": "x"}
    errors = errors_of(bad)
    assert [(list(e.absolute_path), e.validator) for e in errors] == [(["messages", 3], "required")]
    assert errors[0].message == "'tool_call_id' is a required property"


def test_each_message_kind_passes_unknown_fields_and_keeps_its_required_ones():
    kinds = {
        "developer": ({"role": "developer", "content": "d"}, "content"),
        "system": ({"role": "system", "content": "s"}, "content"),
        "user": ({"role": "user", "content": "u"}, "content"),
        "assistant": ({"role": "assistant", "content": "a"}, None),
        "tool": ({"role": "tool", "content": "t", "tool_call_id": "c"}, "tool_call_id"),
        "function": ({"role": "function", "content": "f", "name": "n"}, "name"),
    }
    roles = SCHEMA["$defs"]["ChatCompletionRequestMessage"]["properties"]["role"]["enum"]
    assert sorted(roles) == sorted(kinds)
    for role, (message, required) in kinds.items():
        assert_valid({"messages": [{**message, "extra": 1}]})
        if required != "name":
            assert_valid({"messages": [{**message, "name": None}]})
        if required:
            missing = {k: v for k, v in message.items() if k != required}
            error = best_error({"messages": [missing]})
            assert (list(error.absolute_path), error.validator) == (["messages", 0], "required"), (
                role
            )
