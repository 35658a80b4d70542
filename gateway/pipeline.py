"""A request's life, top to bottom, for every API face (no Tornado here).

`Pipeline.run(face, inbound, record)`:

1. authenticate the caller's key;
2. read the body as JSON, check it against the face's schema, and build the
   upstream body and the model it asks for;
3. pick the candidate deployments (those serving the model that the key may use);
4. admit the request against the key's quota (a 429 without calling Azure);
5. attempt it, failing over between the candidates by gateway/policy/failover.py;
6. answer: one body, or an async iterator of byte chunks for a stream;
7. account: the answer's usage to the quota and the metrics (for a stream,
   when it ends), and everything learnt to the `RequestRecord`, which the
   access log line and the answer's headers are made from.

The handler (handlers/api.py) turns Tornado's request into an `Inbound`,
writes the `Answer` (`async for chunk in answer.stream: write; await flush`)
and renders a raised GatewayError with the face.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.config import Settings
from gateway.encoding import compact_json
from gateway.errors import GatewayError
from gateway.faces import Face
from gateway.gpt_chat import caller_wants_stream_usage, supports_stream_usage, with_stream_usage
from gateway.jsonbody import ParsedBody, parse_body
from gateway.ops.metrics import Metrics
from gateway.policy.deployments import Deployment
from gateway.policy.failover import Failover
from gateway.policy.keys import CallerKey, KeyRing
from gateway.policy.quota import ANONYMOUS, QuotaStore
from gateway.upstream.client import UpstreamCall, UpstreamResponse
from gateway.validation import BodyValidator

# Upstream response headers worth passing to the caller.
RELAYED_HEADERS = ("apim-request-id", "x-ms-region")
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class EventStream(Protocol):
    """Azure's events, pulled (gateway.upstream.client.UpstreamStream)."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    def __aiter__(self) -> AsyncIterator[list[bytes]]: ...

    def close(self) -> None: ...


class Upstream(Protocol):
    """What the pipeline asks of Azure (gateway.upstream.client.UpstreamClient)."""

    async def complete(
        self, deployment: Deployment, operation: str, body: bytes, call: UpstreamCall
    ) -> UpstreamResponse | None: ...

    async def open_stream(
        self, deployment: Deployment, operation: str, body: bytes, call: UpstreamCall
    ) -> EventStream | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Inbound:
    """A request as the pipeline needs it."""

    request_id: str
    headers: Mapping[str, str]
    body: bytes
    body_size: int  # bytes received; over MAX_BODY_SIZE, `body` is empty
    path_args: tuple[str, ...] = ()
    query: str = ""


@dataclass
class RequestRecord:
    """What one request's life taught: the answer's headers and the access-log fields."""

    caller: CallerKey | None = None
    deployment: Deployment | None = None
    attempts: int = 0
    upstream_status: int | None = None
    apim_request_id: str | None = None
    usage: dict[str, Any] | None = None
    first_event_at: float | None = None  # wall clock, when a stream's first events came
    # Headers every answer carries, an error included: request id, quota, attempts.
    headers: dict[str, str] = field(default_factory=dict)
    caller_gone: bool = False
    call: UpstreamCall | None = None

    def caller_left(self) -> None:
        """The caller closed its connection: stop the upstream call at once."""
        self.caller_gone = True
        if self.call is not None:
            self.call.abort("client_gone")

    def pass_on_headers(self, upstream: Mapping[str, str]) -> None:
        for name in RELAYED_HEADERS:
            if name in upstream:
                self.headers[name] = upstream[name]
        self.apim_request_id = upstream.get("apim-request-id")

    @property
    def key_name(self) -> str:
        return self.caller.name if self.caller else ANONYMOUS


@dataclass
class Answer:
    """What the caller gets on success: one body, or a stream of byte chunks."""

    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None


class InFlight:
    """Counts requests being served, so shutdown can wait for them to drain."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True if every request finished within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


def read_json_body(inbound: Inbound, limit: int, max_depth: int) -> ParsedBody:
    """The body, a JSON object, by the strict reader (gateway/jsonbody.py); or a 4xx
    naming what is wrong with it."""
    if inbound.body_size > limit:
        raise GatewayError(
            413, "body_too_large", f"The request body exceeds the limit of {limit} bytes."
        )
    content_type = inbound.headers.get("Content-Type", "application/json")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise GatewayError(
            415,
            "unsupported_media_type",
            f"Content-Type {media_type or '(empty)'} is not supported; "
            "send the body as application/json.",
        )
    body = parse_body(inbound.body, max_depth=max_depth)
    if not isinstance(body.document, dict):
        raise GatewayError(400, "invalid_json", "The request body must be a JSON object.")
    return body


class UpstreamBody:
    """The bytes sent upstream, made once each: the document as the strict reader
    encoded it, or with our request for a stream's usage event (so its tokens can
    be counted)."""

    def __init__(self, body: dict[str, Any], encoded: bytes | None) -> None:
        self.body = body
        self._as_read = encoded  # the reader's encoding, when `body` is the caller's unchanged
        self._encoded: dict[bool, bytes] = {}

    def encoded(self, ask_usage: bool) -> bytes:
        if ask_usage not in self._encoded:
            if ask_usage:
                self._encoded[ask_usage] = compact_json(with_stream_usage(self.body))
            else:
                self._encoded[ask_usage] = self._as_read or compact_json(self.body)
        return self._encoded[ask_usage]


class Pipeline:
    """The gateway's core: everything a request passes through, built once per app."""

    def __init__(
        self,
        *,
        settings: Settings,
        upstream: Upstream,
        failover: Failover,
        validators: Mapping[str, BodyValidator],
        keyring: KeyRing,
        quota: QuotaStore,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.failover = failover
        self.pool = failover.pool
        self.validators = validators
        self.keyring = keyring
        self.quota = quota
        self.metrics = metrics
        self.in_flight = InFlight()

    async def run(self, face: Face, inbound: Inbound, record: RequestRecord) -> Answer:
        """Serve one request; a failure is raised as GatewayError, for the face to render."""
        try:
            record.caller = self.keyring.authenticate(inbound.headers)
            parsed = read_json_body(
                inbound, self.settings.max_body_size, self.settings.max_json_depth
            )
            request = parsed.document
            face.check_query(inbound.query)
            self.validators[face.schema].validate(request)
            model = face.model(request, inbound.path_args)
            if face.build_body is None:
                body = UpstreamBody(request, parsed.encoded)
            else:
                body = UpstreamBody(
                    face.build_body(request, self.settings.parameter_defaults), None
                )
            candidates = self.candidates(face, model, record.caller)
            await self.admit(record)
            if body.body.get("stream"):
                return await self.stream(face, body, candidates, inbound, record)
            return await self.complete(face, body, candidates, inbound, record)
        except GatewayError as error:
            if error.upstream_status is not None:
                record.upstream_status = error.upstream_status
            if error.upstream_headers:
                record.pass_on_headers(error.upstream_headers)
            raise

    def candidates(
        self, face: Face, model: str | None, caller: CallerKey | None
    ) -> tuple[Deployment, ...]:
        """Deployments serving `model` that the caller's key may use.

        A key's `models` name deployments by any of their names, so asking for
        a deployment by its alias is the same as asking by its model name.
        """
        candidates = self.pool.candidates(model)
        if not candidates:
            raise face.unknown_model(model)
        allowed = caller.models if caller else None
        if allowed is None:
            return candidates
        permitted = set(allowed)
        usable = tuple(d for d in candidates if not permitted.isdisjoint(d.names))
        if not usable:
            self.keyring.check_model(caller, [model] if model else [])
        return usable

    async def admit(self, record: RequestRecord) -> None:
        """Count the request against its key's quota; 429 without calling Azure when over."""
        if record.caller is None:
            return
        admission = await self.quota.admit(record.caller)
        record.headers.update(admission.headers)
        if not admission.allowed:
            self.metrics.count_quota_rejection(record.caller.name, admission.limit or "")
            raise GatewayError(
                429,
                "rate_limit_exceeded",
                f"The key {record.caller.name!r} is over its {admission.limit}-per-minute limit; "
                f"retry after {admission.retry_after} s.",
            )

    def _begin_attempt(
        self, deployment: Deployment, inbound: Inbound, record: RequestRecord
    ) -> UpstreamCall:
        record.deployment = deployment
        record.attempts += 1
        record.headers["x-upstream-attempts"] = str(record.attempts)
        record.call = UpstreamCall(inbound.request_id)
        return record.call

    async def complete(
        self,
        face: Face,
        body: UpstreamBody,
        candidates: tuple[Deployment, ...],
        inbound: Inbound,
        record: RequestRecord,
    ) -> Answer:
        """A non-stream answer, from the first attempt that succeeds."""
        plan = self.failover.plan(candidates)
        while not record.caller_gone:
            deployment = await plan.next_deployment()
            call = self._begin_attempt(deployment, inbound, record)
            try:
                response = await self.upstream.complete(
                    deployment, face.operation, body.encoded(False), call
                )
            except GatewayError as error:
                self.metrics.count_attempt(deployment.name, error.code)
                plan.failed(deployment, error)
                continue
            self.metrics.count_attempt(deployment.name, "ok")
            plan.succeeded(deployment)
            if response is None:
                break
            return await self._answered(face, response, record)
        raise GatewayError(499, "client_closed_request", "The caller went away.")

    async def _answered(
        self, face: Face, response: UpstreamResponse, record: RequestRecord
    ) -> Answer:
        record.upstream_status = response.status
        record.pass_on_headers(response.headers)
        record.usage = face.usage_in_answer(response.document)
        await self.account(record)
        return Answer(
            headers={"Content-Type": face.content_type},
            body=face.wrap_success(response.body, response.document),
        )

    async def stream(
        self,
        face: Face,
        body: UpstreamBody,
        candidates: tuple[Deployment, ...],
        inbound: Inbound,
        record: RequestRecord,
    ) -> Answer:
        """A stream, from the first attempt whose first events arrive."""
        caller_asked_usage = caller_wants_stream_usage(body.body)
        plan = self.failover.plan(candidates)
        while not record.caller_gone:
            deployment = await plan.next_deployment()
            call = self._begin_attempt(deployment, inbound, record)
            ask_usage = (
                face.adds_stream_usage
                and not caller_asked_usage
                and supports_stream_usage(deployment.api_version)
            )
            try:
                stream = await self.upstream.open_stream(
                    deployment, face.operation, body.encoded(ask_usage), call
                )
            except GatewayError as error:
                self.metrics.count_attempt(deployment.name, error.code)
                plan.failed(deployment, error)
                continue
            self.metrics.count_attempt(deployment.name, "ok")
            plan.succeeded(deployment)
            if stream is None:
                break
            record.upstream_status = 200
            record.first_event_at = time.time()
            record.pass_on_headers(stream.headers)
            chunks = self._stream_chunks(face, stream, record, drop_usage_event=ask_usage)
            return Answer(headers=dict(STREAM_HEADERS), stream=chunks)
        raise GatewayError(499, "client_closed_request", "The caller went away.")

    async def _stream_chunks(
        self, face: Face, stream: EventStream, record: RequestRecord, *, drop_usage_event: bool
    ) -> AsyncIterator[bytes]:
        """Azure's events as they came, one chunk per step; the usage event we asked for
        left out; a failure after the start as the face's last error event."""
        self.metrics.streams_in_flight.inc()
        try:
            async for events in stream:
                for event in events:
                    usage = face.usage_in_event(event)
                    if usage is not None:
                        record.usage = usage
                        if drop_usage_event:
                            events = [kept for kept in events if kept is not event]
                        break
                if events:
                    chunk = events[0] if len(events) == 1 else b"".join(events)
                    events = []  # only the chunk is held while the caller takes it
                    yield chunk
        except GatewayError as error:
            yield face.stream_error(error)
        finally:
            stream.close()
            self.metrics.streams_in_flight.dec()
            await self.account(record)

    async def account(self, record: RequestRecord) -> None:
        """Add the answer's tokens to the usage report, the key's token quota and the metrics."""
        if not record.usage or record.deployment is None:
            return
        prompt = int(record.usage.get("prompt_tokens") or 0)
        completion = int(record.usage.get("completion_tokens") or 0)
        self.metrics.count_tokens(record.key_name, record.deployment.name, prompt, completion)
        await self.quota.record_usage(
            record.key_name, record.caller, record.deployment.name, prompt, completion
        )
