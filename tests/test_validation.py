"""The gpt_chat schema and the 400 messages it produces."""

import pytest

from gateway.errors import GatewayError
from gateway.validation import BodyValidator, load_registry


@pytest.fixture(scope="module")
def validator():
    return BodyValidator("gpt_chat.schema.json", load_registry())


def rejection(validator, body) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        validator.validate(body)
    assert caught.value.status == 400
    return caught.value


def test_full_original_body_is_valid(validator):
    validator.validate(
        {
            "prompt": "Hi",
            "systemPrompt": "Be brief",
            "assistantPrompt": "Hello",
            "temperature": 0.7,
            "top_p": 0.95,
            "n": 1,
            "stream": False,
            "stop": ["\n", "END"],
            "max_tokens": 800,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "user": "u1",
        },
    )
    validator.validate({"userPrompt": "Hi", "stop": "END"})


@pytest.mark.parametrize(
    "body, param, rule, words",
    [
        ({}, "", "required", "one of the fields 'prompt', 'userPrompt'"),
        ({"prompt": ""}, "prompt", "minLength", "prompt must not be empty"),
        (
            {"prompt": "x", "temperature": 3},
            "temperature",
            "maximum",
            "temperature must be <= 2 (got 3)",
        ),
        (
            {"prompt": "x", "temperature": "hot"},
            "temperature",
            "type",
            "must be of type number or null",
        ),
        ({"prompt": "x", "top_p": 1.5}, "top_p", "maximum", "top_p must be <= 1"),
        ({"prompt": "x", "n": 0}, "n", "minimum", "n must be >= 1"),
        ({"prompt": "x", "n": 1.5}, "n", "type", "n must be of type integer"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "minimum", "max_tokens must be >= 1"),
        ({"prompt": "x", "presence_penalty": -3}, "presence_penalty", "minimum", "must be >= -2"),
        ({"prompt": "x", "stream": "yes"}, "stream", "type", "stream must be of type boolean"),
        (
            {"prompt": "x", "temprature": 1},
            "temprature",
            "additionalProperties",
            "unknown field 'temprature'",
        ),
    ],
)
def test_violations_name_field_and_rule(validator, body, param, rule, words):
    error = rejection(validator, body)
    assert (error.param or "", error.rule) == (param, rule)
    assert words in error.message


def test_stop_with_five_strings(validator):
    error = rejection(validator, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})
    assert error.param == "stop"


def test_long_values_are_not_echoed_in_full(validator):
    error = rejection(validator, {"prompt": "x", "stop": ["y" * 5000] * 5})
    assert len(error.message) < 300


def test_current_chat_fields_are_known(validator):
    validator.validate(
        {
            "model": None,
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            "reasoning_effort": "high",
            "store": True,
            "metadata": {"k": "v"},
            "service_tier": "auto",
            "prompt_cache_key": "tenant-1",
            "prediction": {"type": "content", "content": "draft"},
            "modalities": ["text"],
            "data_sources": [{"type": "azure_search", "parameters": {}}],
            "user": None,
        }
    )


def test_the_known_fields_are_the_current_chat_fields(validator):
    """The typo guard's list: every field of the chat schema, the original's own, Azure's additions."""
    registry = load_registry()
    chat = set(registry.contents("chat_completions.schema.json")["properties"])
    known = set(registry.contents("gpt_chat.schema.json")["properties"])
    prompt_fields = {"prompt", "userPrompt", "systemPrompt", "assistantPrompt"}
    assert known == chat | prompt_fields | {"data_sources", "user_security_context"}


@pytest.mark.parametrize(
    "body, param, rule",
    [
        ({"prompt": "x", "reasoning_efort": "low"}, "reasoning_efort", "additionalProperties"),
        ({"prompt": "x", "reasoning_effort": 3}, "reasoning_effort", "type"),
        ({"prompt": "x", "store": "no"}, "store", "type"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "enum"),
    ],
)
def test_new_fields_are_checked_too(validator, body, param, rule):
    error = rejection(validator, body)
    assert (error.param, error.rule) == (param, rule)
