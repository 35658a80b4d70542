"""An Azure OpenAI chat-completions emulator: a fake upstream on a real socket.

Tests, the benchmark and `python server.py --emulator` talk to it as they would
to Azure (PROTOCOL.md): same URL, auth, bodies, stream events and error bodies.
Answers are deterministic echoes of the last user message and one word is one
token, so a test can predict every byte.

Failures are injected as `Fault`s, queued on the instance (or over HTTP at
`/_emulator/faults`) and taken first in, first out by chat requests that pass
validation. Every chat request, rejected ones included, is kept in `requests`,
so a test can check what the gateway sent and whether it hung up. All state
lives on the `AzureEmulator` instance: tests may run as many as they like.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import socket
import struct
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Iterable, NamedTuple

from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPServerRequest, responses
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler

SYSTEM_FINGERPRINT = "fp_emulator"
FILTER_CATEGORIES = ("hate", "self_harm", "sexual", "violence")
SECRET_HEADERS = ("api-key", "authorization")  # hidden by GET /_emulator/requests
DEFAULT_RETRY_AFTER = 1  # seconds, for a rate_limit fault that names none
KIND_STATUS = MappingProxyType(
    {"rate_limit": 429, "content_filter": 400, "server_error": 500, "unavailable": 503, "timeout": 408}
)
WORD = re.compile(r"\s*\S+(?:\s+\Z)?")  # a word with the whitespace before it (and any trailing)

ACCESS_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
    "for an active subscription and use a correct regional API endpoint for your resource."
)
DEPLOYMENT_NOT_FOUND = (
    "The API deployment for this resource does not exist. If you created the deployment within the last "
    "5 minutes, please wait a moment and try again."
)
RATE_LIMITED = (
    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded "
    "token rate limit of your current OpenAI S0 pricing tier. Please retry after {seconds} seconds. Please go "
    "here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
)
# Azure's 401 for a bearer token it cannot accept has no `error` envelope (PROTOCOL-v1.md section 2.1).
TOKEN_REFUSED = {
    "statusCode": 401,
    "message": "Unauthorized. Access token is missing, invalid, audience is incorrect "
    "(https://cognitiveservices.azure.com), or have expired.",
}
# Azure's 401 for a valid token whose identity lacks the role; inject it as a Fault body.
PERMISSION_DENIED = {
    "error": {"code": "PermissionDenied", "message": "Principal does not have access to API/Operation."}
}
CONTENT_FILTERED = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry."
)

log = logging.getLogger(__name__)


def azure_error(status: int, *, seconds: int = DEFAULT_RETRY_AFTER) -> dict:
    """Return the body Azure answers `status` with (PROTOCOL.md section 5), built afresh each call."""
    server_error = {"type": "server_error", "param": None, "code": None}
    known = {
        400: invalid_request("The request is invalid.", None)["error"],
        401: {"code": "401", "message": ACCESS_DENIED},
        404: {"code": "404", "message": "Resource not found"},
        408: {"code": "Timeout", "message": "The operation was timeout."},
        429: {"code": "429", "message": RATE_LIMITED.format(seconds=seconds)},
        500: {"message": "The server had an error processing your request. Sorry about that!", **server_error},
        503: {"message": "The service is temporarily unable to process your request.", **server_error},
    }
    return {"error": known.get(status) or {"code": str(status), "message": responses.get(status, "Error")}}


def invalid_request(message: str, param: str | None) -> dict:
    """Return the OpenAI-style 400 body Azure uses for a body it cannot accept."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


def filter_results(*detectors: str) -> dict:
    """Return content filter results with every category safe and nothing detected."""
    safe: dict = {name: {"filtered": False, "severity": "safe"} for name in FILTER_CATEGORIES}
    return safe | {name: {"filtered": False, "detected": False} for name in detectors}


def prompt_filter_results() -> list[dict]:
    return [{"prompt_index": 0, "content_filter_results": filter_results("jailbreak")}]


@dataclass
class Fault:
    """One injected failure, applied to the next `times` chat requests (FIFO queue).

    `kind` presets (rate_limit, content_filter, server_error, unavailable,
    timeout) fill in the status, headers and body they imply and leave alone
    whatever is given; a `status` without a `body` gets Azure's body for it.
    """

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: dict | None = None
    kind: str | None = None
    delay: float = 0.0
    chunk_gap: float = 0.0
    reset_after: int | None = None
    hang: bool = False
    times: int = 1

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KIND_STATUS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known kinds: {', '.join(KIND_STATUS)}")
        if not all(isinstance(value, (int, float)) and value >= 0 for value in (self.delay, self.chunk_gap)):
            raise ValueError("fault delay and chunk_gap must be numbers of seconds, not negative")
        if self.reset_after is not None and not (isinstance(self.reset_after, int) and self.reset_after >= 0):
            raise ValueError(f"fault reset_after must be an event count, not {self.reset_after!r}")
        if not isinstance(self.times, int) or self.times < 1:
            raise ValueError(f"fault times must be a positive integer, not {self.times!r}")
        self.headers = {name.lower(): str(value) for name, value in self.headers.items()}
        seconds = DEFAULT_RETRY_AFTER
        if self.kind == "rate_limit":
            # Keep the two headers (and the body's advice) consistent when only one is given.
            millis = self.headers.get("retry-after-ms")
            seconds = int(self.headers.get("retry-after") or (math.ceil(int(millis) / 1000) if millis else seconds))
            self.headers = {"retry-after": str(seconds), "retry-after-ms": str(seconds * 1000)} | self.headers
        if self.kind == "content_filter" and self.body is None:
            filtered = filter_results("jailbreak") | {"violence": {"filtered": True, "severity": "medium"}}
            self.body = {"error": {
                "message": CONTENT_FILTERED, "type": None, "param": "prompt", "code": "content_filter", "status": 400,
                "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": filtered},
            }}
        if self.kind is not None and self.status is None:
            self.status = KIND_STATUS[self.kind]
        if self.status is not None and self.body is None:
            self.body = azure_error(self.status, seconds=seconds)

    @classmethod
    def from_json(cls, obj: dict) -> Fault:
        """Build a fault from a JSON object; raise ValueError naming an unknown key."""
        if not isinstance(obj, dict):
            raise ValueError("a fault must be a JSON object")
        known = [f.name for f in fields(cls)]
        for key in obj:
            if key not in known:
                raise ValueError(f"unknown fault key {key!r}; known keys: {', '.join(known)}")
        try:
            return cls(**obj)
        except (TypeError, AttributeError) as error:
            raise ValueError(f"invalid fault {obj!r}: {error}") from None


class Choice(NamedTuple):
    """What one choice says: `content`, or a call of `function` with `arguments`."""

    content: str | None
    finish_reason: str
    function: str | None = None
    arguments: str = ""
    legacy: bool = False  # a `function_call` (deprecated API) rather than `tool_calls`


def words(text: str | None) -> list[str]:
    """Split text into its tokens (words); they join back into exactly the text."""
    return WORD.findall(text or "")


def message_text(content: Any) -> str:
    """Return a message's text, whether its `content` is a string or a list of parts."""
    if isinstance(content, list):
        texts = (part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text")
        return " ".join(text for text in texts if isinstance(text, str))
    return content if isinstance(content, str) else ""


def forced_function(request: dict) -> tuple[str, bool] | None:
    """Name the function the request forces a call of, and whether through the legacy API."""
    tools, tool_choice, function_call = request.get("tools"), request.get("tool_choice"), request.get("function_call")
    if tools and tool_choice == "required":
        return tools[0]["function"]["name"], False
    if tools and isinstance(tool_choice, dict):
        return tool_choice["function"]["name"], False
    if request.get("functions") and isinstance(function_call, dict):
        return function_call["name"], True
    return None


def plan_choices(request: dict) -> list[Choice]:
    """Decide every choice of the answer to a valid request."""
    users = [message for message in request["messages"] if message.get("role") == "user"]
    text = message_text(users[-1].get("content")) if users else ""
    forced = forced_function(request)
    json_mode = (request.get("response_format") or {}).get("type") in ("json_object", "json_schema")
    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    choices = []
    for index in range(request.get("n") or 1):
        if forced:
            reason = "function_call" if forced[1] else "tool_calls"
            choices.append(Choice(None, reason, forced[0], json.dumps({"echo": text}), forced[1]))
            continue
        content = json.dumps({"echo": text}) if json_mode else f"You said{f' ({index})' if index else ''}: {text}"
        if limit and len(words(content)) > limit:
            choices.append(Choice("".join(words(content)[:limit]), "length"))
        else:
            choices.append(Choice(content, "stop"))
    return choices


def usage(request: dict, choices: list[Choice]) -> dict:
    prompt = sum(len(words(message_text(message.get("content")))) for message in request["messages"])
    completion = sum(len(words(choice.arguments if choice.function else choice.content)) for choice in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(request: dict, choices: list[Choice], completion_id: str, model: str) -> dict:
    """Return the non-stream chat.completion answer (PROTOCOL.md section 3)."""

    def message(index: int, choice: Choice) -> dict:
        body: dict[str, Any] = {"role": "assistant", "content": choice.content, "refusal": None}
        call = {"name": choice.function, "arguments": choice.arguments}
        if choice.function is not None and choice.legacy:
            body["function_call"] = call
        elif choice.function is not None:
            body["tool_calls"] = [{"id": f"call_{completion_id}_{index}", "type": "function", "function": call}]
        return body

    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {"index": index, "message": message(index, choice), "logprobs": None, "finish_reason": choice.finish_reason,
             "content_filter_results": filter_results("protected_material_code", "protected_material_text")}
            for index, choice in enumerate(choices)
        ],
        "prompt_filter_results": prompt_filter_results(),
        "usage": usage(request, choices),
    }


def stream_payloads(
    request: dict, choices: list[Choice], completion_id: str, model: str, *, async_filter: bool = False
) -> list[str]:
    """Return the `data:` payloads of the streamed answer, ending with [DONE] (PROTOCOL.md section 4).

    With `async_filter`, as on deployments with asynchronous content filtering,
    an annotation event (empty id, `content_filter_offsets`, no `delta`)
    follows every second content chunk.
    """
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    head = {"created": int(time.time()), "id": completion_id, "model": model, "object": "chat.completion.chunk",
            "system_fingerprint": SYSTEM_FINGERPRINT} | ({"usage": None} if include_usage else {})
    safe = filter_results("protected_material_code", "protected_material_text")

    def chunk(index: int, delta: dict, finish_reason: str | None = None, filters: dict | None = None) -> dict:
        return {"choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None,
                             "content_filter_results": filters or {}}]} | head

    chunks = [{"choices": [], "created": 0, "id": "", "model": "", "object": "",
               "prompt_filter_results": prompt_filter_results()} | ({"usage": None} if include_usage else {})]
    for index, choice in enumerate(choices):
        chunks.append(chunk(index, {"role": "assistant", "content": "" if choice.function is None else None}))
        if choice.function is None:
            offset = 0
            for count, word in enumerate(words(choice.content), start=1):
                chunks.append(chunk(index, {"content": word}, filters=safe))
                offset += len(word)
                if async_filter and count % 2 == 0:
                    chunks.append(annotation(index, offset, safe))
        elif choice.legacy:
            chunks.append(chunk(index, {"function_call": {"name": choice.function, "arguments": ""}}))
            chunks += [chunk(index, {"function_call": {"arguments": piece}}) for piece in thirds(choice.arguments)]
        else:
            opening = {"index": 0, "id": f"call_{completion_id}_{index}", "type": "function",
                       "function": {"name": choice.function, "arguments": ""}}
            chunks.append(chunk(index, {"tool_calls": [opening]}))
            chunks += [chunk(index, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                       for piece in thirds(choice.arguments)]
        chunks.append(chunk(index, {}, choice.finish_reason))
    if include_usage:
        chunks.append({"choices": []} | head | {"usage": usage(request, choices)})
    return [json.dumps(chunk, separators=(",", ":")) for chunk in chunks] + ["[DONE]"]


def annotation(index: int, offset: int, filters: dict) -> dict:
    """An asynchronous-filter event: which part of the text was checked, and the verdict."""
    return {
        "choices": [{
            "index": index,
            "finish_reason": None,
            "content_filter_results": filters,
            "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": offset},
        }],
        "created": 0, "id": "", "model": "", "object": "",
    }  # fmt: skip


def thirds(text: str) -> list[str]:
    """Cut text into three pieces (fewer if it is very short), as tool-call arguments are streamed."""
    size = max(1, math.ceil(len(text) / 3))
    return [text[start:start + size] for start in range(0, len(text), size)]


def parse_chat_request(body: bytes) -> dict:
    """Parse a chat request body; raise ErrorAnswer(400) where Azure would refuse it."""
    try:
        request = json.loads(body)
    except ValueError:
        raise ErrorAnswer(400, invalid_request("We could not parse the JSON body of your request.", None)) from None
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ErrorAnswer(400, invalid_request("'messages' is a required property", "messages"))
    for name, high in (("n", 128), ("max_tokens", math.inf), ("max_completion_tokens", math.inf)):
        value = request.get(name)
        if value is not None and (type(value) is not int or not 1 <= value <= high):
            raise ErrorAnswer(400, invalid_request(f"Invalid value for '{name}': {value!r}.", name))
    return request


class ErrorAnswer(HTTPError):
    """An HTTP error answered with exactly this JSON body and these extra headers."""

    def __init__(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.body = body
        self.headers = headers or {}


@dataclass
class RecordedRequest:
    """One chat request as the emulator received it, and how its answer ended."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    json: Any | None
    deployment: str | None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)
    response_body: bytes = b""  # the body bytes the emulator wrote, without chunked framing

    @classmethod
    def of(cls, request: HTTPServerRequest) -> RecordedRequest:
        try:
            parsed = json.loads(request.body)
        except ValueError:
            parsed = None
        query = {name: values[-1].decode("utf-8", "replace") for name, values in request.query_arguments.items()}
        headers = {name.lower(): value for name, value in request.headers.items()}
        return cls(request.method or "", request.path, query, headers, request.body, parsed, deployment=None)

    def summary(self) -> dict:
        """Describe the request for GET /_emulator/requests, with the key hidden."""
        headers = {name: "***" if name in SECRET_HEADERS else value for name, value in self.headers.items()}
        return {"method": self.method, "path": self.path, "query": self.query, "headers": headers, "json": self.json}


class EmulatorHandler(RequestHandler):
    """Gives every route the emulator, and shapes every error body in one place."""

    def initialize(self, emulator: AzureEmulator) -> None:
        self.emulator = emulator

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if not isinstance(error, ErrorAnswer):
            error = ErrorAnswer(status_code, azure_error(status_code))
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.write_json(error.body)

    def write_json(self, obj: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(obj).encode())


class ResourceNotFoundHandler(EmulatorHandler):
    """Answer any unknown path as Azure does."""

    def prepare(self) -> None:
        raise ErrorAnswer(404, azure_error(404))


class ChatCompletionsHandler(EmulatorHandler):
    """POST /openai/deployments/{deployment}/chat/completions, with faults applied."""

    def initialize(self, emulator: AzureEmulator) -> None:
        super().initialize(emulator)
        # Here rather than in prepare(), so a request Tornado refuses before prepare() is kept too.
        self.record = RecordedRequest.of(self.request)
        emulator.requests.append(self.record)
        self.aborted = False
        # stop() awaits this, so no handler is still running when the emulator's loop closes.
        self.done = asyncio.get_running_loop().create_future()
        emulator._running.add(self.done)

    def set_default_headers(self) -> None:
        # send_error() calls this again, so error answers carry these too.
        self.set_header("apim-request-id", str(uuid.uuid4()))
        self.set_header("x-ms-region", "emulator")
        if "x-request-id" in self.request.headers:
            self.set_header("x-request-id", self.request.headers["x-request-id"])

    def write(self, chunk: bytes) -> None:  # type: ignore[override]
        self.record.response_body += chunk
        super().write(chunk)

    def on_connection_close(self) -> None:
        if not self.aborted:
            self.record.client_gone.set()

    def on_finish(self) -> None:
        if not (self.aborted or self.record.client_gone.is_set()):
            self.record.finished.set()
        self.done.set_result(None)
        self.emulator._running.discard(self.done)

    async def post(self, deployment: str) -> None:
        self.record.deployment = deployment
        request = self.check(deployment)
        fault = self.emulator._take_fault() or Fault()
        if not await self.pause(fault.delay):
            return
        if fault.hang:
            await self.pause(None)
            return
        if fault.status is not None:
            raise ErrorAnswer(fault.status, fault.body or {}, fault.headers)
        for name, value in fault.headers.items():
            self.set_header(name, value)
        choices = plan_choices(request)
        completion_id = self.emulator._next_completion_id()
        if request.get("stream"):
            payloads = stream_payloads(
                request, choices, completion_id, self.emulator.model, async_filter=self.emulator.async_filter
            )
            await self.stream(payloads, fault)
        elif fault.reset_after is not None:
            self.abort()
        else:
            self.write_json(completion_body(request, choices, completion_id, self.emulator.model))

    def check(self, deployment: str) -> dict:
        """Refuse what Azure refuses, in Azure's order; return the parsed body."""
        version, versions = self.get_query_argument("api-version", None), self.emulator.api_versions
        if version is None or (versions is not None and version not in versions):
            raise ErrorAnswer(404, azure_error(404))
        self.authenticate()
        if deployment not in self.emulator.deployments:
            raise ErrorAnswer(404, {"error": {"code": "DeploymentNotFound", "message": DEPLOYMENT_NOT_FOUND}})
        return parse_chat_request(self.request.body)

    def authenticate(self) -> None:
        """Accept the api-key or, with a `token_verifier`, a bearer token it accepts; else Azure's 401."""
        headers, verifier = self.request.headers, self.emulator.token_verifier
        if verifier is not None and "api-key" not in headers:
            scheme, _, token = headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not verifier(token.strip()):
                raise ErrorAnswer(401, dict(TOKEN_REFUSED))
        elif headers.get("api-key") != self.emulator.key:
            raise ErrorAnswer(401, azure_error(401))

    async def stream(self, payloads: list[str], fault: Fault) -> None:
        """Write and flush each event on its own, `chunk_gap` apart; abort after `reset_after` of them."""
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        for sent, payload in enumerate(payloads):
            if sent and not await self.pause(fault.chunk_gap):
                return
            if sent == fault.reset_after:
                self.abort()
                return
            self.write(f"data: {payload}\n\n".encode())
            try:
                await self.flush()
            except StreamClosedError:
                return

    async def pause(self, seconds: float | None) -> bool:
        """Wait `seconds` (None: for ever); return False if the client went away meanwhile.

        stop() closes every connection, which ends the wait as a client hanging up would.
        """
        if seconds == 0:
            return not self.record.client_gone.is_set()
        try:
            await asyncio.wait_for(self.record.client_gone.wait(), seconds)
        except TimeoutError:
            return True
        return False

    def abort(self) -> None:
        """Drop the connection mid-answer: a TCP reset (SO_LINGER 0) where allowed, else a plain close."""
        self.aborted = True
        stream: IOStream = self.request.connection.stream  # type: ignore[union-attr]
        if not stream.closed():
            try:
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            stream.close()


class FaultsHandler(EmulatorHandler):
    def post(self) -> None:
        """Queue one fault (a JSON object) or several (a list); none if any is invalid."""
        try:
            obj = json.loads(self.request.body)
            faults = [Fault.from_json(item) for item in (obj if isinstance(obj, list) else [obj])]
        except ValueError as error:
            raise ErrorAnswer(400, {"error": {"code": "invalid_fault", "message": str(error)}}) from None
        for fault in faults:
            self.emulator.add_fault(fault)
        self.write_json({"queued": len(faults)})


class RequestsHandler(EmulatorHandler):
    def get(self) -> None:
        self.write_json([record.summary() for record in self.emulator.requests])

    def delete(self) -> None:
        """Forget the recorded requests; queued faults stay."""
        self.emulator.requests.clear()
        self.set_status(204)


class StatsHandler(EmulatorHandler):
    def get(self) -> None:
        emulator = self.emulator
        self.write_json({"connections_accepted": emulator.connections_accepted, "requests": len(emulator.requests)})


class CountingHTTPServer(HTTPServer):
    """An HTTPServer that reports each TCP connection it accepts, to check keep-alive reuse."""

    def initialize(self, *args: Any, emulator: AzureEmulator, **kwargs: Any) -> None:
        self.emulator = emulator
        super().initialize(*args, **kwargs)

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        self.emulator.connections_accepted += 1
        super().handle_stream(stream, address)


class AzureEmulator:
    """A fake Azure OpenAI resource: chat deployments, injected faults and a log of requests."""

    def __init__(
        self,
        *,
        key: str = "emulator-key",
        deployments: Iterable[str] = ("gpt-4o",),
        model: str = "gpt-4o-2024-08-06",
        api_versions: Iterable[str] | None = None,
        async_filter: bool = False,
        token_verifier: Callable[[str], bool] | None = None,
    ) -> None:
        self.key = key
        self.token_verifier = token_verifier  # accepts Authorization: Bearer tokens it returns True for
        self.async_filter = async_filter
        self.deployments = frozenset(deployments)
        self.model = model
        self.api_versions = None if api_versions is None else frozenset(api_versions)
        self.requests: list[RecordedRequest] = []
        self.connections_accepted = 0
        self._faults: deque[Fault] = deque()  # a fault appears once per request it applies to
        self._completions = 0
        self._running: set[asyncio.Future[None]] = set()
        self._server: CountingHTTPServer | None = None
        self._port: int | None = None

    def add_fault(self, fault: Fault) -> None:
        self._faults.extend([fault] * fault.times)

    def clear(self) -> None:
        """Forget faults and recorded requests, and reset the counters."""
        self._faults.clear()
        self.requests.clear()
        self.connections_accepted = 0
        self._completions = 0

    def _take_fault(self) -> Fault | None:
        return self._faults.popleft() if self._faults else None

    def _next_completion_id(self) -> str:
        self._completions += 1
        return f"chatcmpl-emu-{self._completions}"

    def make_app(self) -> Application:
        args = {"emulator": self}
        return Application(
            [
                (r"/openai/deployments/(?P<deployment>[^/]+)/chat/completions", ChatCompletionsHandler, args),
                (r"/_emulator/faults", FaultsHandler, args),
                (r"/_emulator/requests", RequestsHandler, args),
                (r"/_emulator/stats", StatsHandler, args),
            ],
            default_handler_class=ResourceNotFoundHandler,
            default_handler_args=args,
            # The emulator's traffic is not the gateway's: keep it out of tornado.access.
            log_function=lambda handler: log.debug(
                "%d %s %s", handler.get_status(), handler.request.method, handler.request.uri
            ),
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port; port 0 picks a free port (see `port`)."""
        if self._server is not None:
            raise RuntimeError("the emulator is already running")
        sockets = bind_sockets(port, host)
        self._server = CountingHTTPServer(self.make_app(), emulator=self)
        self._server.add_sockets(sockets)
        self._port = sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the emulator has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stop listening, close open connections (ending hangs and pauses) and wait for every answer to end."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.stop()
        await server.close_all_connections()
        await asyncio.gather(*self._running)
