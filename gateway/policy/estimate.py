"""Token estimates made before a request is sent: what admission charges.

The prompt estimate
-------------------
The text a model reads is gathered from the request body and counted once:

- chat: every message's `role`, `name`, `content` (a string or text parts)
  and tool calls, plus `tools` / `functions` (as compact JSON, which errs high
  against the model's own rendering of them);
- Responses: `instructions`, and `input` as a string or as items (every string
  in an item counts, so items of any type are covered), plus `tools`;
- embeddings: `input` as a string or strings, and token arrays exactly (one
  token per array element).

Each message or item adds `TOKENS_PER_MESSAGE`, and a chat adds
`TOKENS_PER_REPLY` for the reply's start, as OpenAI's counting guide does.

Images are not decoded (that would cost more than the request's routing):
one counts `IMAGE_TOKENS_LOW` at `detail: "low"` and `IMAGE_TOKENS_HIGH`
otherwise, the most a high-detail image costs under the 512-px-tile rule of
the GPT-4o family (85 + 8 x 170). Audio and file payloads (`input_audio`,
`file_data`) and files by id cannot be sized without decoding them and count
nothing; the correction after the answer charges what Azure counted.

How text is counted
-------------------
With `tiktoken` and the model's encoding file in `TIKTOKEN_CACHE_DIR`, text
is counted exactly (`encode_ordinary`, so a prompt containing
`<|endoftext|>` is text like any other). tiktoken fetches an encoding from
its public address the first time and keeps it in that directory under the
sha1 hex digest of the address (`tiktoken/load.py`, tiktoken 0.14), checked
against the file's sha256 on every read. `load_cached_encodings` reads only
files already there and whole (same sha256), so a machine without internet
access never waits on a download: pre-seed the directory on a machine that
has it (`TIKTOKEN_CACHE_DIR=dir python -c "import tiktoken;
tiktoken.get_encoding('o200k_base'); tiktoken.get_encoding('cl100k_base')"`)
and copy it.

Without the file, `estimate_text_tokens` counts characters: ASCII characters
at 3 per token and other characters at 2 UTF-8 bytes per token. Measured
against the larger of o200k_base's and cl100k_base's counts, it errs high by
23-43 % on English prose, code and JSON, and by 23-110 % on German, French,
Russian, Arabic, Hindi, Chinese, Japanese and Korean text: those models read
English at about 4 characters per token, and the other scripts at 2.6 UTF-8
bytes per token or more. Text made mostly of emoji is the exception
(cl100k_base spends up to 3 tokens on one): it can be underestimated by some
15 %.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import tiktoken

log = logging.getLogger("azure-gpt-api.estimate")

Operation = Literal["chat", "responses", "embeddings"]

TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_HIGH = 85 + 8 * 170
ASCII_CHARS_PER_TOKEN = 3
OTHER_BYTES_PER_TOKEN = 2
# The completion budget of a request that sets none of the fields below.
DEFAULT_COMPLETION_TOKENS = 1024
COMPLETION_FIELDS: Mapping[Operation, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "responses": ("max_output_tokens",),
    "embeddings": (),
}
# Encoding for a model tiktoken does not know (an Azure deployment may have
# any name): the one of every current OpenAI chat and reasoning model.
DEFAULT_ENCODING = "o200k_base"

CACHE_DIR_VARIABLE = "TIKTOKEN_CACHE_DIR"
# `Estimate.counted_by` when no encoding was loaded for the model.
CHARACTERS = "characters"

# Content-part types counted by the image rule, and fields whose value is a
# binary payload (or a reference to one), never text.
_IMAGE_PARTS = frozenset({"image_url", "input_image"})
_BINARY_FIELDS = frozenset({"image_url", "input_audio", "file_data", "file", "file_id"})


@dataclass(frozen=True)
class EncodingSource:
    """Where tiktoken reads an encoding from, and how to build it once the file is cached."""

    name: str
    url: str
    sha256: str
    load: Callable[[], tiktoken.Encoding]


def _registered(name: str) -> Callable[[], tiktoken.Encoding]:
    return lambda: tiktoken.get_encoding(name)


_BLOB = "https://openaipublic.blob.core.windows.net/encodings"
# The addresses and digests tiktoken 0.14's `tiktoken_ext/openai_public.py`
# reads (the version requirements.txt pins).
TIKTOKEN_SOURCES: tuple[EncodingSource, ...] = (
    EncodingSource(
        "o200k_base",
        f"{_BLOB}/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _registered("o200k_base"),
    ),
    EncodingSource(
        "cl100k_base",
        f"{_BLOB}/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _registered("cl100k_base"),
    ),
)
# Encodings that read the same ranks as another (they differ in special
# tokens only, which `encode_ordinary` never produces).
_SAME_RANKS = {"o200k_harmony": "o200k_base"}


def cache_file_name(url: str) -> str:
    """The name tiktoken gives the cached copy of the file at `url`."""
    return hashlib.sha1(url.encode()).hexdigest()


@contextmanager
def _tiktoken_cache_dir(cache_dir: str) -> Iterator[None]:
    """Point tiktoken at `cache_dir` while encodings load: it reads the location from the
    environment only, and `cache_dir` may have come from the `.env` file."""
    previous = os.environ.get(CACHE_DIR_VARIABLE)
    os.environ[CACHE_DIR_VARIABLE] = cache_dir
    try:
        yield
    finally:
        if previous is None:
            del os.environ[CACHE_DIR_VARIABLE]
        else:
            os.environ[CACHE_DIR_VARIABLE] = previous


def load_cached_encodings(
    cache_dir: str, sources: Sequence[EncodingSource] = TIKTOKEN_SOURCES
) -> dict[str, tiktoken.Encoding]:
    """The encodings whose files are in `cache_dir` and whole; the others are left out.

    A missing file is normal (the character estimate is used); a file whose
    sha256 is wrong is logged, since tiktoken would delete it and try to
    download it again. Meant for start-up: loading o200k_base takes ~0.3 s.
    """
    encodings: dict[str, tiktoken.Encoding] = {}
    for source in sources:
        path = os.path.join(cache_dir, cache_file_name(source.url))
        try:
            with open(path, "rb") as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
        except FileNotFoundError:
            continue
        except OSError as error:
            log.warning("cannot read tiktoken file %s for %s: %s", path, source.name, error)
            continue
        if digest != source.sha256:
            log.warning(
                "tiktoken file %s for %s is not the published one (sha256 %s); "
                "estimating %s by characters",
                path,
                source.name,
                digest,
                source.name,
            )
            continue
        with _tiktoken_cache_dir(cache_dir):
            encodings[source.name] = source.load()
    return encodings


def estimate_text_tokens(text: str) -> int:
    """Tokens in `text` by the character rule of the module docstring (errs high)."""
    if text.isascii():
        return math.ceil(len(text) / ASCII_CHARS_PER_TOKEN)
    ascii_chars = len(text.encode("ascii", "ignore"))
    other_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars
    return math.ceil(ascii_chars / ASCII_CHARS_PER_TOKEN) + math.ceil(
        other_bytes / OTHER_BYTES_PER_TOKEN
    )


@dataclass(frozen=True)
class Estimate:
    """What a request is expected to cost in tokens, before Azure has seen it.

    `completion_explicit` is True when the caller set the completion budget:
    a request whose prompt plus that budget exceed a limit can never fit,
    whereas the default budget is only a guess. `counted_by` names the
    encoding text was counted with, or is "characters".
    """

    prompt_tokens: int
    completion_tokens: int
    completion_explicit: bool
    counted_by: str

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class _Gathered:
    """Text to count, and the tokens already known without counting text."""

    __slots__ = ("texts", "tokens")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.tokens = 0

    def value(self, value: Any) -> None:
        """Every string in `value` (keys of objects excepted), images by the image rule."""
        if isinstance(value, str):
            self.texts.append(value)
        elif isinstance(value, list):
            for item in value:
                self.value(item)
        elif isinstance(value, dict):
            if value.get("type") in _IMAGE_PARTS:
                self.tokens += image_tokens(value)
                return
            for name, item in value.items():
                if name not in _BINARY_FIELDS:
                    self.value(item)

    def messages(self, messages: Any) -> None:
        if not isinstance(messages, list):
            return
        for message in messages:
            self.tokens += TOKENS_PER_MESSAGE
            self.value(message)

    def tools(self, tools: Any) -> None:
        if isinstance(tools, list) and tools:
            self.texts.append(json.dumps(tools, separators=(",", ":"), ensure_ascii=False))


def image_tokens(part: Mapping[str, Any]) -> int:
    """An image part's tokens: `detail` is on the part (Responses) or in `image_url` (chat)."""
    detail = part.get("detail")
    image_url = part.get("image_url")
    if detail is None and isinstance(image_url, dict):
        detail = image_url.get("detail")
    return IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS_HIGH


def completion_budget(
    body: Mapping[str, Any], operation: Operation, default: int
) -> tuple[int, bool]:
    """The most tokens the answer may have, and whether the caller set it.

    Chat's `n` answers each get the budget.
    """
    if operation == "embeddings":
        return 0, True
    for name in COMPLETION_FIELDS[operation]:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            budget, explicit = value, True
            break
    else:
        budget, explicit = default, False
    choices = body.get("n") if operation == "chat" else None
    if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
        budget *= choices
    return budget, explicit


class TokenEstimator:
    """Estimates a request's tokens; `encodings` come from `load_cached_encodings`."""

    def __init__(
        self,
        encodings: Mapping[str, tiktoken.Encoding] | None = None,
        *,
        default_completion_tokens: int = DEFAULT_COMPLETION_TOKENS,
        default_encoding: str = DEFAULT_ENCODING,
    ) -> None:
        self.encodings = dict(encodings or {})
        self.default_completion_tokens = default_completion_tokens
        self.default_encoding = default_encoding

    def encoding_for(self, models: Sequence[str]) -> tiktoken.Encoding | None:
        """The loaded encoding of the first of `models` tiktoken knows, else the default's."""
        for model in models:
            try:
                name = tiktoken.encoding_name_for_model(model)
            except KeyError:
                continue
            return self.encodings.get(_SAME_RANKS.get(name, name))
        return self.encodings.get(self.default_encoding)

    def count_text(self, text: str, encoding: tiktoken.Encoding | None) -> int:
        if encoding is None:
            return estimate_text_tokens(text)
        return len(encoding.encode_ordinary(text))

    def estimate(
        self, body: Mapping[str, Any], operation: Operation, models: Sequence[str] = ()
    ) -> Estimate:
        """The prompt estimate and completion budget of the upstream `body`.

        `models` are the names the request may be counted as (the caller's
        `model`, the deployment's model names); the first tiktoken knows picks
        the encoding.
        """
        encoding = self.encoding_for(models)
        gathered = _Gathered()
        if operation == "chat":
            gathered.messages(body.get("messages"))
            gathered.tokens += TOKENS_PER_REPLY
            gathered.tools(body.get("tools"))
            gathered.tools(body.get("functions"))
        elif operation == "responses":
            instructions = body.get("instructions")
            if isinstance(instructions, str):
                gathered.tokens += TOKENS_PER_MESSAGE
                gathered.texts.append(instructions)
            prompt = body.get("input")
            if isinstance(prompt, list):
                gathered.messages(prompt)
            elif isinstance(prompt, str):
                gathered.tokens += TOKENS_PER_MESSAGE
                gathered.texts.append(prompt)
            gathered.tools(body.get("tools"))
        else:
            gathered.tokens += self._embedding_input_tokens(body.get("input"), gathered)
        prompt_tokens = gathered.tokens
        if gathered.texts:
            prompt_tokens += self.count_text("\n".join(gathered.texts), encoding)
        completion, explicit = completion_budget(body, operation, self.default_completion_tokens)
        counted_by = encoding.name if encoding is not None else CHARACTERS
        return Estimate(prompt_tokens, completion, explicit, counted_by)

    @staticmethod
    def _embedding_input_tokens(value: Any, gathered: _Gathered) -> int:
        """Token arrays count exactly; strings are left in `gathered` to be counted."""
        if isinstance(value, str):
            gathered.texts.append(value)
            return 0
        if not isinstance(value, list) or not value:
            return 0
        if all(isinstance(item, int) for item in value):
            return len(value)
        tokens = 0
        for item in value:
            if isinstance(item, str):
                gathered.texts.append(item)
            elif isinstance(item, list):
                tokens += len(item)
        return tokens
