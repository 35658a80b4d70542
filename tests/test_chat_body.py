"""The upstream body built from the original API's request."""

import pytest

from gateway.errors import GatewayError
from gateway.gpt_chat import build_gpt_chat_body


def test_messages_in_the_original_order():
    body = build_gpt_chat_body(
        {"systemPrompt": "Be brief.", "prompt": "Hi", "assistantPrompt": "Hello!"}, {}
    )
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_user_prompt_alias_and_optional_roles_left_out():
    body = build_gpt_chat_body(
        {"userPrompt": "Hi", "systemPrompt": "", "assistantPrompt": None}, {}
    )
    assert body == {"messages": [{"role": "user", "content": "Hi"}]}


def test_request_value_then_default_then_omitted():
    defaults = {"temperature": 0.2, "max_tokens": 30, "user": "team"}
    body = build_gpt_chat_body({"prompt": "x", "temperature": 1.1, "stop": "END"}, defaults)
    assert body == {
        "messages": [{"role": "user", "content": "x"}],
        "temperature": 1.1,
        "stop": "END",
        "max_tokens": 30,
        "user": "team",
    }


def test_null_and_empty_fall_back_and_are_never_sent():
    body = build_gpt_chat_body(
        {"prompt": "x", "temperature": None, "user": ""}, {"temperature": 0.5}
    )
    assert body == {"messages": [{"role": "user", "content": "x"}], "temperature": 0.5}


def test_zero_is_a_value_not_absence():
    body = build_gpt_chat_body(
        {"prompt": "x", "temperature": 0, "stream": False}, {"temperature": 1.0, "stream": True}
    )
    assert body["temperature"] == 0 and body["stream"] is False


def test_messages_replace_the_prompt_fields_and_features_pass_through():
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    tools = [
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    ]
    body = build_gpt_chat_body(
        {
            "messages": conversation,
            "tools": tools,
            "tool_choice": "auto",
            "seed": 0,
            "logit_bias": None,
        },
        {"temperature": 0.4},
    )
    assert body == {
        "messages": conversation,
        "temperature": 0.4,
        "tools": tools,
        "tool_choice": "auto",
        "seed": 0,
    }


def test_messages_and_a_prompt_together_are_refused():
    with pytest.raises(GatewayError) as caught:
        build_gpt_chat_body({"messages": [{"role": "user", "content": "a"}], "prompt": "b"}, {})
    assert caught.value.status == 400
    assert caught.value.param == "messages"
    assert "not both" in caught.value.message and "'prompt'" in caught.value.message


def test_current_chat_fields_pass_through_but_model_does_not():
    """This route picks the deployment; the caller's `model` is accepted, not forwarded."""
    fields = {
        "reasoning_effort": "high",
        "store": False,
        "metadata": {"k": "v"},
        "prediction": {"type": "content", "content": "draft"},
        "service_tier": "auto",
        "user_security_context": {"end_user_id": "u"},
    }
    body = build_gpt_chat_body({"prompt": "Hi", "model": "gpt-5", **fields}, {})
    assert body == {"messages": [{"role": "user", "content": "Hi"}], **fields}
