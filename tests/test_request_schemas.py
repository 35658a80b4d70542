"""schema/derive.py and the request schemas it writes: Responses and embeddings bodies, the policy.

The chat schema's bodies are in test_chat_schema.py; here: the committed schemas are what
the script derives from the spec copy in the repository, the pass-through policy holds in
every schema (unknown fields pass, null is accepted wherever a field is optional, only tags
are enums), and the Responses and embeddings schemas accept what the SDKs send and refuse
what is certainly wrong, the gateway's fast path agreeing with jsonschema on each body.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from gateway.validation import BodyValidator, load_registry

from .support.schemas import subschemas

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "schema"
PASS_THROUGH = ("chat_completions.schema.json", "responses.schema.json", "embeddings.schema.json")
DERIVE_TIMEOUT = 60


def load_derive() -> Any:
    spec = importlib.util.spec_from_file_location("derive", SCHEMA_DIR / "derive.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_derive(schema_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(schema_dir / "derive.py"), *args],
        capture_output=True,
        text=True,
        timeout=DERIVE_TIMEOUT,
        check=False,
    )


# --------------------------------------------------------------------------- the derivation


def test_the_committed_schemas_are_what_the_script_derives():
    result = run_derive(SCHEMA_DIR, "--check")
    assert result.returncode == 0, result.stderr


def test_the_check_names_a_schema_edited_by_hand_and_writing_restores_it(tmp_path):
    copy = tmp_path / "schema"
    shutil.copytree(SCHEMA_DIR, copy)
    edited = copy / "responses.schema.json"
    edited.write_text(edited.read_text().replace('"maximum": 2', '"maximum": 3', 1))
    result = run_derive(copy, "--check")
    assert (result.returncode, result.stderr.strip()) == (
        1,
        "not as derived (run schema/derive.py): responses.schema.json",
    )
    assert run_derive(copy).returncode == 0
    assert edited.read_text() == (SCHEMA_DIR / "responses.schema.json").read_text()


def test_the_spec_copy_holds_exactly_the_components_the_schemas_read():
    derive = load_derive()
    source = json.loads(derive.SOURCE.read_text())
    assert derive.trim(source)["components"] == source["components"]
    assert source["info"]["version"] == "2.3.0"


# --------------------------------------------------------------------------- the policy


@pytest.mark.parametrize("schema_id", PASS_THROUGH)
def test_no_object_refuses_unknown_fields(schema_id):
    schema = load_registry().contents(schema_id)
    assert all(sub.get("additionalProperties") is not False for sub in subschemas(schema))


@pytest.mark.parametrize("schema_id", PASS_THROUGH)
def test_every_optional_field_at_every_depth_accepts_null(schema_id):
    schema = load_registry().contents(schema_id)
    root = Draft202012Validator(schema)
    checked = 0
    for sub in subschemas(schema):
        properties = sub.get("properties")
        if not isinstance(properties, dict) or "if" in sub:
            continue
        for name, rule in properties.items():
            if name not in sub.get("required", ()) and isinstance(rule, dict):
                assert root.evolve(schema=rule).is_valid(None), name
                checked += 1
    assert checked >= len(schema["properties"]) - len(schema["required"])


@pytest.mark.parametrize("schema_id", PASS_THROUGH)
def test_only_tags_are_enums(schema_id):
    """An enum of more than one value is the tag list of a union; vocabularies are Azure's."""
    schema = load_registry().contents(schema_id)
    tag_lists = [
        id(rule)
        for sub in subschemas(schema)
        if "allOf" in sub
        for rule in sub.get("properties", {}).values()
    ]
    for sub in subschemas(schema):
        values = [value for value in sub.get("enum", ()) if value is not None]
        if len(values) > 1:
            assert id(sub) in tag_lists, sub


# --------------------------------------------------------------------------- bodies


class Checked:
    """jsonschema and the gateway's fast path on one schema; they must agree on every body."""

    def __init__(self, schema_id: str) -> None:
        registry = load_registry()
        self.describer = Draft202012Validator(registry.contents(schema_id), registry=registry)
        self.fast = BodyValidator(schema_id, registry)

    def assert_valid(self, body: Any) -> None:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in self.describer.iter_errors(body)]
        assert not errors
        assert self.fast.is_valid(body)

    def error(self, body: Any) -> tuple[list[Any], str]:
        error = best_match(self.describer.iter_errors(body))
        assert error is not None, "body was accepted"
        assert not self.fast.is_valid(body)
        return list(error.absolute_path), str(error.validator)


RESPONSES = Checked("responses.schema.json")
EMBEDDINGS = Checked("embeddings.schema.json")

RESPONSES_BODIES = {
    "string_input": {"model": "gpt-5", "input": "Tell me a story"},
    "azure_dated_route_without_model": {"input": "Hi", "store": False, "model": None},
    "stream_with_instructions": {
        "model": "o4-mini",
        "input": "Hi",
        "instructions": "Be brief.",
        "stream": True,
        "stream_options": {"include_obfuscation": False},
        "reasoning": {"effort": "high", "summary": "auto"},
        "max_output_tokens": 2000,
    },
    "follow_up": {
        "model": "gpt-4.1",
        "previous_response_id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
        "input": [
            {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'},
            {"role": "user", "content": [{"type": "input_text", "text": "and tomorrow?"}]},
            {"type": "item_reference", "id": "msg_1"},
            {"type": "a_future_item", "anything": True},
        ],
        "include": ["reasoning.encrypted_content", "a.future.include"],
    },
    "tools_and_structured_text": {
        "model": "gpt-5",
        "input": "Weather in Paris, as JSON",
        "tools": [
            {
                "type": "function",
                "name": "weather",
                "parameters": {"type": "object"},
                "strict": True,
            },
            {"type": "web_search_preview"},
            {"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example"},
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "text": {
            "format": {"type": "json_schema", "name": "weather", "schema": {"type": "object"}},
            "verbosity": "low",
        },
        "metadata": {"run": "1"},
        "truncation": "auto",
        "service_tier": "default",
        "background": False,
        "max_tool_calls": 3,
        "top_logprobs": 5,
        "temperature": 0.2,
        "top_p": 0.9,
        "safety_identifier": "h-1",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "in-memory",
        "conversation": {"id": "conv_1"},
        "prompt": {"id": "pmpt_1", "variables": {"city": "Paris"}},
        "user": None,
        "a_future_field": [1],
    },
    # Azure's AzureCreateResponse has no lower bound here, OpenAI's says 16.
    "small_max_output_tokens": {"model": "gpt-4o", "input": "Hi", "max_output_tokens": 5},
}


@pytest.mark.parametrize("request_body", RESPONSES_BODIES.values(), ids=RESPONSES_BODIES)
def test_responses_bodies_the_sdks_send_are_valid(request_body):
    RESPONSES.assert_valid(request_body)


@pytest.mark.parametrize(
    ("request_body", "path", "keyword"),
    [
        ({"input": "x", "temperature": 5}, ["temperature"], "maximum"),
        ({"input": "x", "top_p": 2}, ["top_p"], "maximum"),
        ({"input": "x", "top_logprobs": 21}, ["top_logprobs"], "maximum"),
        ({"input": "x", "stream": "yes"}, ["stream"], "type"),
        ({"input": "x", "store": "no"}, ["store"], "type"),
        ({"input": "x", "previous_response_id": 5}, ["previous_response_id"], "type"),
        ({"input": "x", "max_output_tokens": "many"}, ["max_output_tokens"], "type"),
        ({"input": 5}, ["input"], "type"),
        ({"input": "x", "model": 4}, ["model"], "type"),
        ({"input": "x", "metadata": {"k": 1}}, ["metadata", "k"], "type"),
        ({"input": "x", "reasoning": "high"}, ["reasoning"], "type"),
        ({"input": "x", "tools": {"type": "function"}}, ["tools"], "type"),
        ({"input": "x", "tool_choice": 5}, ["tool_choice"], "type"),
        ({"input": "x", "instructions": ["a"]}, ["instructions"], "type"),
        ({"input": "x", "safety_identifier": "u" * 65}, ["safety_identifier"], "maxLength"),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "w"}}},
            ["text", "format"],
            "required",
        ),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, ["text", "format", "type"], "enum"),
    ],
)
def test_responses_bodies_that_are_certainly_wrong_are_refused(request_body, path, keyword):
    assert RESPONSES.error(request_body) == (path, keyword)


EMBEDDINGS_BODIES = {
    "string": {"model": "text-embedding-3-small", "input": "hello"},
    "strings_base64": {"model": "e", "input": ["a", "b"], "encoding_format": "base64"},
    "token_ids": {"input": [1, 2, 3], "dimensions": 256, "model": None},
    "token_arrays": {"input": [[1, 2], [3]], "encoding_format": "float", "user": "u"},
    "batch_of_2048": {"input": ["x"] * 2048},
    # Azure's dated embeddings take `input_type`; unknown fields pass.
    "azure_input_type": {"input": "query", "input_type": "query"},
}


@pytest.mark.parametrize("request_body", EMBEDDINGS_BODIES.values(), ids=EMBEDDINGS_BODIES)
def test_embeddings_bodies_the_sdks_send_are_valid(request_body):
    EMBEDDINGS.assert_valid(request_body)


@pytest.mark.parametrize(
    ("request_body", "path", "keyword"),
    [
        ({"model": "e"}, [], "required"),
        ({"input": 5}, ["input"], "type"),
        ({"input": "x", "dimensions": 0}, ["dimensions"], "minimum"),
        ({"input": "x", "dimensions": 1.5}, ["dimensions"], "type"),
        ({"input": "x", "encoding_format": 1}, ["encoding_format"], "type"),
        ({"input": "x", "model": ["e"]}, ["model"], "type"),
    ],
)
def test_embeddings_bodies_that_are_certainly_wrong_are_refused(request_body, path, keyword):
    assert EMBEDDINGS.error(request_body) == (path, keyword)


@pytest.mark.parametrize(
    "request_body", [{"input": []}, {"input": ["x"] * 2049}, {"input": [None]}]
)
def test_embeddings_input_outside_the_four_forms_is_refused(request_body):
    path, _ = EMBEDDINGS.error(request_body)
    assert path[:1] == ["input"]
