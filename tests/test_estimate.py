"""Token estimates from request bodies: the character rule, the completion budget, and the
tiktoken path with a small encoding file each test builds in its own cache directory."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

from gateway.policy.estimate import (
    CACHE_DIR_VARIABLE,
    CHARACTERS,
    DEFAULT_COMPLETION_TOKENS,
    IMAGE_TOKENS_HIGH,
    IMAGE_TOKENS_LOW,
    TIKTOKEN_SOURCES,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_REPLY,
    EncodingSource,
    TokenEstimator,
    cache_file_name,
    estimate_text_tokens,
    load_cached_encodings,
)

# Split into words and runs of spaces; "hello" and "world" are single tokens.
TINY_PATTERN = r"\S+|\s+"
TINY_MERGES = (b"he", b"ll", b"hell", b"hello", b"wo", b"wor", b"worl", b"world")
# Not a scheme tiktoken can fetch: a wrong cache name fails instead of going anywhere.
TINY_URL = "test-only://encodings/tiny.tiktoken"


def tiny_ranks() -> dict[bytes, int]:
    ranks = {bytes([byte]): byte for byte in range(256)}
    for merge in TINY_MERGES:
        ranks[merge] = len(ranks)
    return ranks


def write_tiny_encoding(cache_dir: Path) -> str:
    """The tiny encoding in tiktoken's file format, cached where tiktoken looks: its sha256."""
    lines = [
        base64.b64encode(token) + b" " + str(rank).encode() for token, rank in tiny_ranks().items()
    ]
    data = b"\n".join(lines) + b"\n"
    (cache_dir / cache_file_name(TINY_URL)).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def tiny_source(name: str, sha256: str) -> EncodingSource:
    def load() -> tiktoken.Encoding:
        # tiktoken's own reader: it finds the file by the cache name, or fails.
        ranks = tiktoken.load.load_tiktoken_bpe(TINY_URL, expected_hash=sha256)
        return tiktoken.Encoding(
            name, pat_str=TINY_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )

    return EncodingSource(name, TINY_URL, sha256, load)


@pytest.fixture
def tiny(tmp_path: Path) -> tiktoken.Encoding:
    sha256 = write_tiny_encoding(tmp_path)
    encodings = load_cached_encodings(str(tmp_path), [tiny_source("o200k_base", sha256)])
    return encodings["o200k_base"]


def chat(*messages, **extra):
    return {"model": "gpt-4o", "messages": list(messages), **extra}


def user(content):
    return {"role": "user", "content": content}


# --- the character rule -------------------------------------------------------


def test_ascii_counts_three_characters_a_token_and_other_text_two_bytes():
    assert estimate_text_tokens("") == 0
    assert estimate_text_tokens("abc") == 1
    assert estimate_text_tokens("abcd") == 2
    # "é" is 2 UTF-8 bytes (1 token), "中" 3 (2 tokens), "🎉" 4 (2 tokens).
    assert estimate_text_tokens("é") == 1
    assert estimate_text_tokens("ab中") == 1 + 2
    assert estimate_text_tokens("🎉🎉") == 4
    # A lone surrogate (json.loads lets one through) is counted, not an error.
    assert estimate_text_tokens("\ud800") == 2


def test_a_chat_counts_every_message_its_text_parts_and_a_reply():
    estimator = TokenEstimator()
    text = "x" * 300
    estimate = estimator.estimate(
        chat(
            {"role": "system", "content": text},
            user([{"type": "text", "text": text}, {"type": "text", "text": text}]),
        ),
        "chat",
    )
    # Role names and the parts' "type" values count too (errs high), joined by newlines.
    texts = ["system", text, "user", "text", text, "text", text]
    expected = 2 * TOKENS_PER_MESSAGE + TOKENS_PER_REPLY + estimate_text_tokens("\n".join(texts))
    assert estimate.prompt_tokens == expected
    assert estimate.counted_by == CHARACTERS


def test_images_count_by_detail_and_their_bytes_never_count_as_text():
    estimator = TokenEstimator()
    image = "data:image/png;base64," + "A" * 200_000
    low = {"type": "image_url", "image_url": {"url": image, "detail": "low"}}
    high = {"type": "image_url", "image_url": {"url": image}}
    body = chat(user([low, high]))
    base = estimator.estimate(chat(user([])), "chat").prompt_tokens
    assert estimator.estimate(body, "chat").prompt_tokens == base + IMAGE_TOKENS_LOW + (
        IMAGE_TOKENS_HIGH
    )
    # Responses' input_image carries detail beside image_url.
    responses = {
        "input": [
            {
                "role": "user",
                "content": [{"type": "input_image", "image_url": image, "detail": "low"}],
            }
        ]
    }
    assert estimator.estimate(responses, "responses").prompt_tokens == (
        TOKENS_PER_MESSAGE + IMAGE_TOKENS_LOW + estimate_text_tokens("user")
    )


def test_audio_and_file_payloads_count_nothing():
    estimator = TokenEstimator()
    audio = {"type": "input_audio", "input_audio": {"data": "U" * 100_000, "format": "wav"}}
    document = {"type": "file", "file": {"file_data": "F" * 100_000, "filename": "a.pdf"}}
    with_payloads = estimator.estimate(chat(user([audio, document])), "chat").prompt_tokens
    assert with_payloads < 20


def test_tools_and_functions_count_as_compact_json():
    estimator = TokenEstimator()
    tool = {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
    }
    bare = estimator.estimate(chat(user("hi")), "chat").prompt_tokens
    with_tools = estimator.estimate(chat(user("hi"), tools=[tool]), "chat").prompt_tokens
    with_functions = estimator.estimate(
        chat(user("hi"), functions=[tool["function"]]), "chat"
    ).prompt_tokens
    assert with_tools - bare >= estimate_text_tokens(
        '{"type":"function","function":{"name":"lookup"'
    )
    assert bare < with_functions < with_tools


def test_tool_calls_and_tool_results_count():
    estimator = TokenEstimator()
    arguments = '{"city": "' + "Paris " * 50 + '"}'
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": arguments}}
        ],
    }
    result = {"role": "tool", "tool_call_id": "c1", "content": "sunny " * 50}
    estimate = estimator.estimate(chat(user("hi"), call, result), "chat")
    assert estimate.prompt_tokens > estimate_text_tokens(arguments) + estimate_text_tokens(
        "sunny " * 50
    )


def test_responses_input_as_a_string_or_items_with_instructions():
    estimator = TokenEstimator()
    text = "y" * 90
    plain = estimator.estimate({"input": text}, "responses")
    assert plain.prompt_tokens == TOKENS_PER_MESSAGE + 30
    instructed = estimator.estimate({"input": text, "instructions": text}, "responses")
    assert instructed.prompt_tokens == 2 * TOKENS_PER_MESSAGE + estimate_text_tokens(
        text + "\n" + text
    )
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": text}]},
        {"type": "function_call_output", "call_id": "c", "output": text},
    ]
    itemized = estimator.estimate({"input": items}, "responses")
    assert itemized.prompt_tokens > 2 * TOKENS_PER_MESSAGE + 2 * 30


def test_embeddings_count_strings_and_token_arrays_exactly():
    estimator = TokenEstimator()
    assert estimator.estimate({"input": "abcdef"}, "embeddings").prompt_tokens == 2
    assert estimator.estimate({"input": ["abc", "abcdef"]}, "embeddings").prompt_tokens == (
        estimate_text_tokens("abc\nabcdef")
    )
    assert estimator.estimate({"input": [1, 2, 3, 4, 5]}, "embeddings").prompt_tokens == 5
    tokens = estimator.estimate({"input": [[1, 2, 3], [4, 5]]}, "embeddings")
    assert (tokens.prompt_tokens, tokens.completion_tokens) == (5, 0)


# --- the completion budget ------------------------------------------------------


def test_completion_budget_comes_from_the_request_or_the_default():
    estimator = TokenEstimator(default_completion_tokens=700)
    body = chat(user("hi"))
    default = estimator.estimate(body, "chat")
    assert (default.completion_tokens, default.completion_explicit) == (700, False)
    assert TokenEstimator().estimate(body, "chat").completion_tokens == DEFAULT_COMPLETION_TOKENS
    given = estimator.estimate({**body, "max_tokens": 50}, "chat")
    assert (given.completion_tokens, given.completion_explicit) == (50, True)
    both = estimator.estimate({**body, "max_tokens": 50, "max_completion_tokens": 80}, "chat")
    assert both.completion_tokens == 80
    # null (LangChain sends it) means not given.
    assert estimator.estimate({**body, "max_tokens": None}, "chat").completion_tokens == 700
    assert estimator.estimate({**body, "max_tokens": 50, "n": 3}, "chat").completion_tokens == 150
    responses = estimator.estimate({"input": "hi", "max_output_tokens": 64}, "responses")
    assert (responses.completion_tokens, responses.completion_explicit) == (64, True)
    assert estimator.estimate({"input": "hi"}, "responses").completion_tokens == 700
    assert given.total == given.prompt_tokens + 50


# --- tiktoken -----------------------------------------------------------------


def test_a_cached_encoding_is_read_by_tiktoken_from_its_cache_name(tiny):
    assert tiny.encode_ordinary("hello world") == [259, 32, 263]
    estimator = TokenEstimator({"o200k_base": tiny})
    estimate = estimator.estimate(chat(user("hello world")), "chat", ["gpt-4o"])
    # "user" is 4 single-byte tokens, "\n" 1, then hello, " ", world.
    assert estimate.prompt_tokens == TOKENS_PER_MESSAGE + TOKENS_PER_REPLY + 4 + 1 + 3
    assert estimate.counted_by == "o200k_base"


def test_loading_leaves_the_environment_as_it_was(tmp_path, monkeypatch):
    sha256 = write_tiny_encoding(tmp_path)
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "elsewhere"))
    assert list(load_cached_encodings(str(tmp_path), [tiny_source("tiny", sha256)])) == ["tiny"]
    assert os.environ[CACHE_DIR_VARIABLE] == str(tmp_path / "elsewhere")
    monkeypatch.delenv(CACHE_DIR_VARIABLE)
    load_cached_encodings(str(tmp_path), [tiny_source("tiny", sha256)])
    assert CACHE_DIR_VARIABLE not in os.environ


def test_special_token_text_is_counted_as_text(tiny):
    estimator = TokenEstimator({"o200k_base": tiny})
    estimate = estimator.estimate({"input": "<|endoftext|>"}, "responses", ["gpt-4o"])
    assert estimate.prompt_tokens == TOKENS_PER_MESSAGE + len(b"<|endoftext|>")


def test_the_model_picks_its_encoding_and_unknown_names_get_the_default(tmp_path):
    sha256 = write_tiny_encoding(tmp_path)
    loaded = load_cached_encodings(
        str(tmp_path), [tiny_source("o200k_base", sha256), tiny_source("cl100k_base", sha256)]
    )
    estimator = TokenEstimator(loaded)
    assert estimator.encoding_for(["gpt-4o-2024-08-06"]) is loaded["o200k_base"]
    assert estimator.encoding_for(["my-deployment", "gpt-35-turbo"]) is loaded["cl100k_base"]
    assert estimator.encoding_for(["gpt-oss-120b"]) is loaded["o200k_base"]
    assert estimator.encoding_for(["prod-chat"]) is loaded["o200k_base"]
    assert estimator.encoding_for([]) is loaded["o200k_base"]
    # A model whose encoding is not loaded is counted by characters.
    only_cl100k = TokenEstimator({"cl100k_base": loaded["cl100k_base"]})
    assert only_cl100k.encoding_for(["gpt-4o"]) is None
    assert only_cl100k.estimate({"input": "hi"}, "responses", ["gpt-4o"]).counted_by == CHARACTERS


def test_no_cached_file_means_no_encoding(tmp_path):
    assert load_cached_encodings(str(tmp_path)) == {}
    assert load_cached_encodings(str(tmp_path / "absent")) == {}


def test_a_damaged_file_is_left_alone_and_logged(tmp_path, caplog):
    damaged = tmp_path / cache_file_name(TIKTOKEN_SOURCES[0].url)
    damaged.write_bytes(b"not an encoding\n")
    with caplog.at_level(logging.WARNING, logger="azure-gpt-api.estimate"):
        assert load_cached_encodings(str(tmp_path)) == {}
    # tiktoken, given the file, would have deleted it to download it again.
    assert damaged.read_bytes() == b"not an encoding\n"
    assert "o200k_base" in caplog.text and "not the published one" in caplog.text


def test_the_sources_are_where_tiktoken_reads_them(monkeypatch):
    """The addresses must be tiktoken's: its cache is named after them."""
    import tiktoken_ext.openai_public as public

    calls: list[tuple[str, str | None]] = []

    def record(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        calls.append((url, expected_hash))
        return {bytes([byte]): byte for byte in range(256)}

    monkeypatch.setattr(public, "load_tiktoken_bpe", record)
    for source in TIKTOKEN_SOURCES:
        getattr(public, source.name)()
    assert calls == [(source.url, source.sha256) for source in TIKTOKEN_SOURCES]
