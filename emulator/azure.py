"""The Azure OpenAI emulator: a fake Azure OpenAI resource on a real socket.

Tests, the benchmark and `python server.py --emulator` talk to it as they would
to Azure (PROTOCOL.md, PROTOCOL-v1.md): same URLs, auth, bodies, stream events
and error bodies. It serves chat completions, the Responses API and embeddings
on both URL families, and the v1 model list:

- dated: `/openai/deployments/{d}/chat/completions` and `/openai/deployments/{d}/embeddings`
  (`api-version` required), `/openai/responses` and its `/{id}` forms (`api-version` a
  preview date, 2025-03-01-preview or later);
- v1: `/openai/v1/chat/completions`, `/openai/v1/embeddings`, `/openai/v1/responses` and
  its `/{id}`, `/{id}/cancel`, `/{id}/input_items` forms, `/openai/v1/models[/{id}]`
  (`api-version` optional: `v1` or `preview`).

The deployment is the path's `{d}` on dated chat and embeddings, and the body's
`model` everywhere else. Every deployment serves every operation. Answers are
deterministic (see `answers`), so a test can predict every byte.

Failures are injected as `Fault`s, queued on the instance (or over HTTP at
`/_emulator/faults`) and taken first in, first out by API requests that pass
validation. Every API request, rejected ones included, is kept in `requests`,
so a test can check what the gateway sent and whether it hung up. All state
lives on the `AzureEmulator` instance: tests may run as many as they like.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import struct
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders, HTTPServerRequest
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from .chat import check_chat_request, completion_body, plan_choices, stream_payloads
from .embeddings import check_embeddings_request, embeddings_body
from .errors import (
    ErrorAnswer,
    azure_error,
    bad_request,
    deployment_not_found,
    model_not_found,
    resource_not_found,
    token_refused,
)
from .faults import Fault
from .responses import (
    ACTIVE,
    ResponseStore,
    StoredResponse,
    check_response_request,
    event_frame,
    input_items,
    input_tokens,
    items_page,
    new_id,
    output_items,
    plan_turn,
    response_object,
    response_usage,
    stream_events,
    unfinished,
)

SECRET_HEADERS = ("api-key", "authorization")  # hidden by GET /_emulator/requests
V1_VERSIONS = ("v1", "preview")
RESPONSES_PREVIEW = re.compile(r"\d{4}-\d{2}-\d{2}-preview")
FIRST_RESPONSES_PREVIEW = (
    "2025-03-01-preview"  # no GA dated version has /responses (PROTOCOL-v1.md section 1)
)
MODEL_CREATED = (
    1_700_000_000  # `created` of every listed model: a fixed time keeps answers predictable
)
DEFAULT_EMBEDDING_DIMENSIONS = 1536  # text-embedding-3-small

log = logging.getLogger(__name__)


@dataclass
class RecordedRequest:
    """One API request as the emulator received it, and how its answer ended."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    json: Any | None
    deployment: str | None
    operation: str  # e.g. "chat.completions", "responses.create", "embeddings"
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)
    response_body: bytes = b""  # the body bytes the emulator wrote, without chunked framing

    @classmethod
    def of(cls, request: HTTPServerRequest, operation: str) -> RecordedRequest:
        try:
            parsed = json.loads(request.body)
        except ValueError:
            parsed = None
        query = {
            name: values[-1].decode("utf-8", "replace")
            for name, values in request.query_arguments.items()
        }
        headers = {name.lower(): value for name, value in request.headers.items()}
        return cls(
            request.method or "",
            request.path,
            query,
            headers,
            request.body,
            parsed,
            None,
            operation,
        )

    def summary(self) -> dict:
        """Describe the request for GET /_emulator/requests, with the key hidden."""
        headers = {
            name: "***" if name in SECRET_HEADERS else value for name, value in self.headers.items()
        }
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "json": self.json,
            "operation": self.operation,
            "deployment": self.deployment,
        }


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
        raise resource_not_found()


class ApiHandler(EmulatorHandler):
    """One Azure API operation: access checks, faults, and answers written, streamed or dropped.

    `v1` says which URL family the route belongs to; `operation` names what it
    does in `RecordedRequest.operation`.
    """

    operation = ""
    responses_api = False  # dated Responses paths take only preview api-versions

    def initialize(  # type: ignore[override]
        self, emulator: AzureEmulator, v1: bool = False
    ) -> None:
        super().initialize(emulator)
        self.v1 = v1
        # Here rather than in prepare(), so a request Tornado refuses before prepare() is kept too.
        self.record = RecordedRequest.of(self.request, self.operation)
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

    def check_access(self) -> None:
        """Refuse an api-version the path does not serve (404), then bad credentials (401)."""
        version, versions = self.get_query_argument("api-version", None), self.emulator.api_versions
        if self.v1:
            served = version is None or version in V1_VERSIONS
        elif version is None:
            served = False
        elif versions is not None:
            served = version in versions
        else:
            served = not self.responses_api or (
                RESPONSES_PREVIEW.fullmatch(version) is not None
                and version >= FIRST_RESPONSES_PREVIEW
            )
        if not served:
            raise resource_not_found()
        headers = self.request.headers
        if not self.emulator.authorizes(headers, v1=self.v1):
            bearer_expected = self.emulator.token_verifier is not None and "api-key" not in headers
            raise ErrorAnswer(401, token_refused() if bearer_expected else azure_error(401))

    def use_deployment(self, deployment: str) -> str:
        self.record.deployment = deployment
        if deployment not in self.emulator.deployments:
            raise deployment_not_found()
        return deployment

    def parse_body(self) -> Any:
        try:
            return json.loads(self.request.body)
        except ValueError:
            raise bad_request("We could not parse the JSON body of your request.", None) from None

    def body_deployment(self, body: Any) -> str:
        """The deployment a body names in `model`, where the path names none."""
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):
            raise bad_request(
                "Missing required parameter: 'model'.", "model", "missing_required_parameter"
            )
        return self.use_deployment(model)

    def deployment_body(self, deployment: str | None) -> Any:
        """The JSON body of a route whose deployment is in the path or, on v1, in `model`.

        A deployment the path names is checked before the body is read.
        """
        if deployment is None:
            body = self.parse_body()
            self.body_deployment(body)
            return body
        self.use_deployment(deployment)
        return self.parse_body()

    async def begin(self, *, wait: bool = True) -> Fault | None:
        """Take the next fault and carry out its delay (if `wait`), hang and status.

        Return None if the client went away meanwhile.
        """
        fault = self.emulator._take_fault() or Fault()
        if wait and not await self.pause(fault.delay):
            return None
        if fault.hang and wait:
            await self.pause(None)
            return None
        if fault.status is not None:
            raise ErrorAnswer(fault.status, fault.body or {}, fault.headers)
        for name, value in fault.headers.items():
            self.set_header(name, value)
        return fault

    def answer(self, obj: Any, fault: Fault) -> None:
        """Write a JSON answer, or drop the connection before it if the fault says so."""
        if fault.reset_after is not None:
            self.abort()
        else:
            self.write_json(obj)

    async def stream(self, frames: list[bytes], fault: Fault) -> bool:
        """Write and flush each event on its own, `chunk_gap` apart (and `first_gap` more
        after the first); abort after `reset_after`.

        Return whether every event was sent.
        """
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        for sent, frame in enumerate(frames):
            gap = fault.chunk_gap + (fault.first_gap if sent == 1 else 0.0)
            if sent and not await self.pause(gap):
                return False
            if sent == fault.reset_after:
                self.abort()
                return False
            self.write(frame)
            try:
                await self.flush()
            except StreamClosedError:
                return False
        return True

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
        """Drop the connection mid-answer: a TCP reset (SO_LINGER 0) where allowed, else a close."""
        self.aborted = True
        stream: IOStream = self.request.connection.stream  # type: ignore[union-attr]
        if not stream.closed():
            try:
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            except OSError:
                pass
            stream.close()


class ChatCompletionsHandler(ApiHandler):
    """POST /openai/deployments/{deployment}/chat/completions, or /openai/v1/chat/completions."""

    operation = "chat.completions"

    async def post(self, deployment: str | None = None) -> None:
        self.check_access()
        body = self.deployment_body(deployment)
        request = check_chat_request(body)
        fault = await self.begin()
        if fault is None:
            return
        choices = plan_choices(request)
        completion_id = self.emulator._next_completion_id()
        model = self.emulator.model
        if request.get("stream"):
            payloads = stream_payloads(
                request, choices, completion_id, model, async_filter=self.emulator.async_filter
            )
            await self.stream([f"data: {payload}\n\n".encode() for payload in payloads], fault)
        else:
            self.answer(completion_body(request, choices, completion_id, model), fault)


class EmbeddingsHandler(ApiHandler):
    """POST /openai/deployments/{deployment}/embeddings, or /openai/v1/embeddings."""

    operation = "embeddings"

    async def post(self, deployment: str | None = None) -> None:
        self.check_access()
        body = self.deployment_body(deployment)
        emulator = self.emulator
        inputs = check_embeddings_request(body, emulator.embedding_dimensions)
        fault = await self.begin()
        if fault is not None:
            self.answer(
                embeddings_body(
                    body, inputs, emulator.embedding_model, emulator.embedding_dimensions
                ),
                fault,
            )


class ResponsesHandler(ApiHandler):
    """POST /openai/v1/responses or /openai/responses: stored unless `store` is false."""

    operation = "responses.create"
    responses_api = True

    async def post(self) -> None:
        self.check_access()
        body = self.parse_body()
        deployment = self.body_deployment(body)
        request = check_response_request(body)
        emulator = self.emulator
        previous_id = request.get("previous_response_id")
        previous = (
            emulator.stored_responses.previous(previous_id) if previous_id is not None else None
        )
        # A background stream is streamed as it runs; only a background JSON create answers at once.
        background = bool(request.get("background")) and not request.get("stream")
        fault = await self.begin(wait=not background)
        if fault is None:
            return
        items = input_items(request)
        turn = plan_turn(request, items)
        usage = response_usage(input_tokens(request, items, previous), turn)
        status = "incomplete" if turn.incomplete else "completed"
        final = response_object(
            request,
            new_id("resp"),
            emulator.model,
            status=status,
            output=output_items(turn),
            usage=usage,
        )
        stored = StoredResponse(final, items, deployment) if final["store"] else None
        if stored is not None and background:
            stored.response = unfinished(final, "queued")
            emulator._start_run(stored, final, fault)
            emulator.stored_responses.put(stored)
            self.answer(stored.response, fault)
        elif request.get("stream"):
            if stored is not None:
                stored.response = unfinished(final)
                emulator.stored_responses.put(stored)
            sent = await self.stream([event_frame(event) for event in stream_events(final)], fault)
            if stored is not None:
                stored.settle(final if sent else self.cut_short(final))
        else:
            if stored is not None and fault.reset_after is None:
                stored.settle(final)
                emulator.stored_responses.put(stored)
            self.answer(final, fault)

    def cut_short(self, final: dict) -> dict:
        """What a stream cut short leaves stored: cancelled if the client left, else failed."""
        if self.record.client_gone.is_set():
            return unfinished(final, "cancelled")
        error = {
            "code": "server_error",
            "message": "The response stream ended before the response was complete.",
        }
        return unfinished(final, "failed") | {"error": error}


class StoredResponseHandler(ApiHandler):
    """Base of the routes that address a stored response by id."""

    responses_api = True

    def stored(self, response_id: str) -> StoredResponse:
        self.check_access()
        stored = self.emulator.stored_responses.get(response_id)
        self.record.deployment = stored.deployment
        return stored


class ResponseHandler(StoredResponseHandler):
    """GET and DELETE /openai/v1/responses/{id} (or /openai/responses/{id})."""

    @property
    def operation(self) -> str:  # type: ignore[override]
        return "responses.delete" if self.request.method == "DELETE" else "responses.retrieve"

    async def get(self, response_id: str) -> None:
        stored = self.stored(response_id)
        if self.get_query_argument("stream", "false") == "true":
            message = (
                "This emulator does not resume streams; retrieve the response without 'stream'."
            )
            raise bad_request(message, "stream")
        fault = await self.begin()
        if fault is not None:
            self.answer(stored.response, fault)

    async def delete(self, response_id: str) -> None:
        self.stored(response_id)
        fault = await self.begin()
        if fault is not None:
            self.answer(self.emulator.stored_responses.delete(response_id), fault)


class ResponseCancelHandler(StoredResponseHandler):
    """POST /openai/v1/responses/{id}/cancel: only background responses can be cancelled (O)."""

    operation = "responses.cancel"

    async def post(self, response_id: str) -> None:
        stored = self.stored(response_id)
        if not stored.response["background"]:
            raise bad_request("Cannot cancel a synchronous response.", None)
        fault = await self.begin()
        if fault is None:
            return
        if stored.response["status"] in ACTIVE:
            if stored.run is not None:
                stored.run.cancel()
            stored.settle(stored.response | {"status": "cancelled"})
        self.answer(stored.response, fault)


class InputItemsHandler(StoredResponseHandler):
    """GET /openai/v1/responses/{id}/input_items: the items a response was made from, by page."""

    operation = "responses.input_items"

    async def get(self, response_id: str) -> None:
        stored = self.stored(response_id)
        page = items_page(stored.input_items, self.record.query)
        fault = await self.begin()
        if fault is not None:
            self.answer(page, fault)


class ModelsHandler(ApiHandler):
    """GET /openai/v1/models[/{model}]: the deployments, the names a v1 body's `model` takes.

    Whether Azure lists deployments or base models here is not documented
    (PROTOCOL-v1.md section 8); deployments are what a client can call.
    """

    operation = "models"

    async def get(self, model: str | None = None) -> None:
        self.check_access()
        if model is not None and model not in self.emulator.deployments:
            raise model_not_found(model)
        fault = await self.begin()
        if fault is None:
            return
        listed = [self.model_object(name) for name in sorted(self.emulator.deployments)]
        self.answer(
            self.model_object(model) if model else {"object": "list", "data": listed}, fault
        )

    def model_object(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "system"}


class FaultsHandler(EmulatorHandler):
    def post(self) -> None:
        """Queue one fault (a JSON object) or several (a list); none if any is invalid."""
        try:
            obj = json.loads(self.request.body)
            faults = [Fault.from_json(item) for item in (obj if isinstance(obj, list) else [obj])]
        except ValueError as error:
            raise ErrorAnswer(
                400, {"error": {"code": "invalid_fault", "message": str(error)}}
            ) from None
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
        self.write_json(
            {
                "connections_accepted": emulator.connections_accepted,
                "requests": len(emulator.requests),
            }
        )


class CountingHTTPServer(HTTPServer):
    """An HTTPServer that reports each TCP connection it accepts, to check keep-alive reuse."""

    def initialize(self, *args: Any, emulator: AzureEmulator, **kwargs: Any) -> None:
        self.emulator = emulator
        super().initialize(*args, **kwargs)

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        self.emulator.connections_accepted += 1
        super().handle_stream(stream, address)


class AzureEmulator:
    """A fake Azure OpenAI resource: deployments, stored responses, faults and a request log."""

    def __init__(
        self,
        *,
        key: str = "emulator-key",
        deployments: Iterable[str] = ("gpt-4o",),
        model: str = "gpt-4o-2024-08-06",
        api_versions: Iterable[str] | None = None,
        async_filter: bool = False,
        embedding_model: str = "text-embedding-3-small",
        embedding_dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS,
        token_verifier: Callable[[str], bool] | None = None,
    ) -> None:
        self.key = key
        self.token_verifier = (
            token_verifier  # accepts Authorization: Bearer tokens it returns True for
        )
        self.async_filter = async_filter
        self.deployments = frozenset(deployments)
        self.model = model
        self.embedding_model = embedding_model
        self.embedding_dimensions = embedding_dimensions
        self.api_versions = None if api_versions is None else frozenset(api_versions)
        self.requests: list[RecordedRequest] = []
        self.stored_responses = ResponseStore()
        self.connections_accepted = 0
        self._faults: deque[Fault] = deque()  # a fault appears once per request it applies to
        self._completions = 0
        self._running: set[asyncio.Future[None]] = set()
        self._server: CountingHTTPServer | None = None
        self._port: int | None = None

    def authorizes(self, headers: HTTPHeaders, *, v1: bool) -> bool:
        """Whether a request's credentials open this resource.

        The `api-key` header everywhere; on v1 paths also `Authorization: Bearer <key>`,
        which is what `OpenAI(base_url=".../openai/v1/", api_key=key)` sends (PROTOCOL-v1.md 2).
        With a `token_verifier`, also `Authorization: Bearer <token>` with an Entra ID token
        it accepts, on every path.
        """
        if headers.get("api-key") == self.key:
            return True
        scheme, _, credential = headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        if self.token_verifier is not None and self.token_verifier(credential.strip()):
            return True
        return v1 and credential == self.key

    def add_fault(self, fault: Fault) -> None:
        self._faults.extend([fault] * fault.times)

    def clear(self) -> None:
        """Forget faults, recorded requests and stored responses, and reset the counters."""
        self._faults.clear()
        self.requests.clear()
        self.stored_responses.clear()
        self.connections_accepted = 0
        self._completions = 0

    def _take_fault(self) -> Fault | None:
        return self._faults.popleft() if self._faults else None

    def _next_completion_id(self) -> str:
        self._completions += 1
        return f"chatcmpl-emu-{self._completions}"

    def _start_run(self, stored: StoredResponse, final: dict, fault: Fault) -> None:
        """Run a background response: in progress for the fault's `delay` (for ever if it
        hangs), then `final`."""

        async def run() -> None:
            stored.response = stored.response | {"status": "in_progress"}
            if fault.hang:
                await asyncio.Event().wait()
            await asyncio.sleep(fault.delay)
            stored.settle(final)

        stored.run = asyncio.get_running_loop().create_task(run())

    def make_app(self) -> Application:
        args = {"emulator": self}
        v1 = {"emulator": self, "v1": True}
        deployment = r"/openai/deployments/(?P<deployment>[^/]+)"
        response = r"/responses/(?P<response_id>[^/]+)"
        routes: list[tuple[str, type[RequestHandler], dict]] = [
            (deployment + "/chat/completions", ChatCompletionsHandler, args),
            (deployment + "/embeddings", EmbeddingsHandler, args),
            (r"/openai/v1/chat/completions", ChatCompletionsHandler, v1),
            (r"/openai/v1/embeddings", EmbeddingsHandler, v1),
            (r"/openai/v1/models", ModelsHandler, v1),
            (r"/openai/v1/models/(?P<model>[^/]+)", ModelsHandler, v1),
        ]
        for base, family in ((r"/openai", args), (r"/openai/v1", v1)):
            routes += [
                (base + r"/responses", ResponsesHandler, family),
                (base + response, ResponseHandler, family),
                (base + response + r"/cancel", ResponseCancelHandler, family),
                (base + response + r"/input_items", InputItemsHandler, family),
            ]
        routes += [
            (r"/_emulator/faults", FaultsHandler, args),
            (r"/_emulator/requests", RequestsHandler, args),
            (r"/_emulator/stats", StatsHandler, args),
        ]
        return Application(
            routes,
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
        """Stop listening, close connections (ending hangs and pauses), end background runs.

        Return once every answer and run has ended.
        """
        if self._server is None:
            return
        server, self._server = self._server, None
        server.stop()
        await server.close_all_connections()
        runs = self.stored_responses.runs()
        for run in runs:
            run.cancel()
        await asyncio.gather(*self._running, *runs, return_exceptions=True)
