"""A request's life, top to bottom, for every API face (no Tornado here).

`Pipeline.run(face, inbound, record)`:

1. authenticate the caller: a key, or an OIDC token (gateway/policy/callers.py);
2. read the body as JSON (unless the face has none), check it against the
   face's schema, and build the upstream body and the model it asks for;
3. pick the candidate deployments (those serving the model that the key may
   use), or the one deployment holding the stored response the request is
   tied to (gateway/policy/affinity.py);
4. estimate the request's tokens (gateway/policy/estimate.py) and admit it
   against the key's budgets and limits (a 429 without calling Azure);
5. attempt it, failing over between the candidates by gateway/policy/failover.py
   (the lowest priority group with capacity first), keeping Azure's remaining
   counts of every answer;
6. answer: one body, or an async iterator of byte chunks for a stream, with
   a `: keep-alive` comment after each `STREAM_KEEPALIVE` seconds of silence;
7. account: the answer's usage to the quota (correcting the estimate), the
   budgets and the metrics (for a stream, when it ends), and everything
   learnt to the `RequestRecord`, which the access log line and the answer's
   headers are made from.

The record's `trace` (gateway/ops/tracing.py) gets one call per step: the
request described, each attempt's span begun, ended and described by
gateway/ops/genai.py. With tracing off these calls do nothing.

The handler (handlers/api.py) turns Tornado's request into an `Inbound`,
writes the `Answer` (`async for chunk in answer.stream: write; await flush`)
and renders a raised GatewayError with the face.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.config import Settings
from gateway.encoding import compact_json
from gateway.errors import GatewayError
from gateway.faces import Face
from gateway.gpt_chat import caller_wants_stream_usage, supports_stream_usage, with_stream_usage
from gateway.holders import NOT_HELD, Holders, response_not_found
from gateway.jsonbody import ParsedBody, parse_body
from gateway.ops import genai
from gateway.ops.admin import RecentAttempts
from gateway.ops.metrics import Metrics
from gateway.ops.tracing import NO_ATTEMPT, NO_REQUEST, AttemptTrace, RequestTrace, Tracer
from gateway.policy.affinity import AffinityStore, MemoryAffinity
from gateway.policy.budgets import TokenUsage, cost_usd
from gateway.policy.callers import Callers
from gateway.policy.deployments import Deployment
from gateway.policy.estimate import Estimate, TokenEstimator
from gateway.policy.failover import Failover, FailoverPlan
from gateway.policy.keys import CallerKey, KeyRing
from gateway.policy.limits import Charge
from gateway.policy.quota import ANONYMOUS, QuotaStore, has_limits
from gateway.responses import created_response
from gateway.upstream.auth import TokenSources, UpstreamAuth
from gateway.upstream.client import UpstreamCall, UpstreamResponse, UpstreamTarget
from gateway.upstream.urls import names_model_in_body
from gateway.validation import BodyValidator

# Upstream response headers worth passing to the caller.
RELAYED_HEADERS = ("apim-request-id", "x-ms-region")
# Azure's own rate-limit state, for callers whose key has no limits of its own
# (a key with limits gets its key's, from the quota).
AZURE_RATE_LIMIT_HEADERS = ("x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens")
# What a request is charged when its tokens decide nothing, or it has no body (a
# stored response's retrieve, delete, ...).
NO_TOKENS = Estimate(0, 0, completion_explicit=False, counted_by="none")
# An SSE comment: clients skip it, proxies see bytes and keep the connection.
KEEPALIVE_COMMENT = b": keep-alive\n\n"
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

log = logging.getLogger(__name__)


class EventStream(Protocol):
    """Azure's events, pulled (gateway.upstream.client.UpstreamStream).

    A step is the events received since the previous one; an empty step is a
    silence of STREAM_KEEPALIVE seconds, answered with a keep-alive comment.
    """

    @property
    def headers(self) -> Mapping[str, str]: ...

    def __aiter__(self) -> AsyncIterator[list[bytes]]: ...

    def close(self) -> None: ...


class Upstream(Protocol):
    """What the pipeline asks of Azure (gateway.upstream.client.UpstreamClient)."""

    async def complete(
        self,
        deployment: Deployment,
        target: UpstreamTarget | str,
        body: bytes | None,
        call: UpstreamCall,
        *,
        parse: bool = True,
    ) -> UpstreamResponse | None: ...

    async def open_stream(
        self,
        deployment: Deployment,
        target: UpstreamTarget | str,
        body: bytes | None,
        call: UpstreamCall,
        *,
        ends_stream: Callable[[bytes], bool] = ...,
    ) -> EventStream | None: ...

    def auth_of(self, deployment: Deployment) -> UpstreamAuth: ...

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
    charge: Charge | None = None  # what admission charged the key's window
    error_code: str | None = None  # the GatewayError the request failed with
    trace: RequestTrace = NO_REQUEST
    attempt: AttemptTrace = NO_ATTEMPT  # the trace of the attempt under way, or the last

    def caller_left(self) -> None:
        """The caller closed its connection: stop the upstream call at once."""
        self.caller_gone = True
        if self.call is not None:
            self.call.abort("client_gone")

    def pass_on_headers(self, upstream: Mapping[str, str]) -> None:
        for name in RELAYED_HEADERS:
            if name in upstream:
                self.headers[name] = upstream[name]
        if self.caller is None or not has_limits(self.caller):
            for name in AZURE_RATE_LIMIT_HEADERS:
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
    encoded it, with our request for a stream's usage event (so its tokens can be
    counted), and with `model` set to the Azure deployment's name where the URL does
    not name it (Azure's v1 API, the Responses API)."""

    def __init__(self, body: dict[str, Any], encoded: bytes | None) -> None:
        self.body = body
        self._as_read = encoded  # the reader's encoding, when `body` is the caller's unchanged
        self._encoded: dict[tuple[bool, str | None], bytes] = {}

    def encoded(self, ask_usage: bool, model: str | None = None) -> bytes:
        if model == self.body.get("model"):
            model = None
        key = (ask_usage, model)
        if key not in self._encoded:
            body = self.body if model is None else {**self.body, "model": model}
            if ask_usage:
                self._encoded[key] = compact_json(with_stream_usage(body))
            elif model is None:
                self._encoded[key] = self._as_read or compact_json(body)
            else:
                self._encoded[key] = compact_json(body)
        return self._encoded[key]

    def for_deployment(self, deployment: Deployment, operation: str, ask_usage: bool) -> bytes:
        named = deployment.deployment if names_model_in_body(deployment, operation) else None
        return self.encoded(ask_usage, named)


def asks_stream(query: str) -> bool:
    """`?stream=true`: a stored response's events again (resuming a background stream)."""
    return "stream=true" in query.split("&")


def forwarded_query(query: str) -> str:
    """The caller's query string without `api-version` (each deployment has its own)."""
    return "&".join(
        part for part in query.split("&") if part and not part.startswith("api-version=")
    )


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
        estimator: TokenEstimator,
        affinity: AffinityStore | None = None,
        callers: Callers | None = None,
        credentials: TokenSources | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.failover = failover
        self.pool = failover.pool
        self.validators = validators
        self.keyring = keyring
        self.quota = quota
        self.metrics = metrics
        self.affinity = affinity or MemoryAffinity(settings.response_affinity_ttl)
        self.holders = Holders(self.pool, self.affinity, upstream, metrics)
        self.estimator = estimator
        self.board = failover.pool.board
        self.callers = callers or Callers(keyring)
        self.credentials = credentials or TokenSources()
        self.tracer = tracer or Tracer()
        self.recent_attempts = RecentAttempts()
        self.in_flight = InFlight()

    def start(self) -> None:
        """Begin the background work: Entra tokens for the deployments, the OIDC issuer's keys.

        Logs which credential each deployment uses.
        """
        for deployment in self.pool.deployments:
            auth = self.upstream.auth_of(deployment)
            log.info("deployment %s authenticates with %s", deployment.name, auth.description)
        self.credentials.start()
        self.callers.start()

    def waiting_for(self) -> list[str]:
        """What the gateway still lacks to serve (nothing once ready), for /readyz."""
        missing = [
            f"an Entra ID token for {deployment.name}"
            for deployment in self.pool.deployments
            if not self.upstream.auth_of(deployment).ready
        ]
        if not self.callers.ready:
            missing.append("the OIDC issuer's signing keys")
        return missing

    async def close(self) -> None:
        """Close the upstream connections, the credentials, the quota and affinity stores."""
        self.upstream.close()
        await self.credentials.close()
        await self.callers.close()
        await self.quota.close()
        await self.affinity.close()

    async def run(self, face: Face, inbound: Inbound, record: RequestRecord) -> Answer:
        """Serve one request; a failure is raised as GatewayError, for the face to render."""
        try:
            record.caller = await self.callers.authenticate(inbound.headers)
            request: dict[str, Any] = {}
            parsed: ParsedBody | None = None
            if face.reads_body:
                parsed = read_json_body(
                    inbound, self.settings.max_body_size, self.settings.max_json_depth
                )
                request = parsed.document
            face.check_query(inbound.query)
            if face.reads_body:
                self.validators[face.schema].validate(request)
            model = face.model(request, inbound.path_args)
            body: UpstreamBody | None = None
            if parsed is not None and face.build_body is None:
                body = UpstreamBody(request, parsed.encoded)
            elif parsed is not None and face.build_body is not None:
                body = UpstreamBody(
                    face.build_body(request, self.settings.parameter_defaults), None
                )
            target = UpstreamTarget(
                face.operation,
                face.method,
                face.item.format(*inbound.path_args),
                forwarded_query(inbound.query) if face.passes_query else "",
            )
            genai.describe_request(
                record.trace, face.operation, {} if body is None else body.body, model
            )
            candidates = self.candidates(face, model, record.caller)
            streams = face.may_stream and (
                bool(body.body.get("stream")) if body is not None else asks_stream(inbound.query)
            )
            estimate = self.estimate(face, body, model, candidates, record.caller)
            held = face.held_response(request, inbound.path_args) if face.held_response else None
            if held is not None:
                holder = await self.holders.holder(face, held, candidates)
                if holder is None and not face.reads_body and not streams:
                    await self.admit(record, estimate)
                    return await self.probe(face, target, held, candidates, inbound, record)
                if holder is None:
                    holder = await self.holders.look_up(face, held, candidates, inbound.request_id)
                candidates = (holder,)
            await self.admit(record, estimate)
            if streams:
                return await self.stream(
                    face, target, body, candidates, inbound, record, estimate.total, held
                )
            return await self.complete(
                face, target, body, candidates, inbound, record, estimate.total, held
            )
        except GatewayError as error:
            record.error_code = error.code
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
            raise face.unknown_model(model, self.visible_models(caller))
        allowed = caller.models if caller else None
        if allowed is None:
            return candidates
        permitted = set(allowed)
        usable = tuple(d for d in candidates if not permitted.isdisjoint(d.names))
        if not usable:
            self.keyring.check_model(caller, [model] if model else [])
        return usable

    def estimate(
        self,
        face: Face,
        body: UpstreamBody | None,
        model: str | None,
        candidates: tuple[Deployment, ...],
        caller: CallerKey | None,
    ) -> Estimate:
        """The request's tokens, counted only where they decide something: a key with limits
        or budgets to charge, or more than one deployment to choose between by capacity."""
        if body is None or (len(candidates) < 2 and (caller is None or not has_limits(caller))):
            return NO_TOKENS
        names = (model, *(name for d in candidates for name in d.models))
        return self.estimator.estimate(
            body.body, face.estimate_as, [name for name in names if name]
        )

    def visible_models(self, caller: CallerKey | None) -> list[str]:
        """The names GET /v1/models lists for this caller."""
        allowed = caller.models if caller else None
        return [name for name in self.pool.model_names() if allowed is None or name in allowed]

    async def admit(self, record: RequestRecord, estimate: Estimate) -> None:
        """Charge the request's estimate to its key; 429 without calling Azure when over."""
        if record.caller is None:
            return
        admission = await self.quota.admit(record.caller, estimate)
        record.headers.update(admission.headers)
        if admission.refusal is not None:
            self.metrics.count_quota_rejection(record.caller.name, admission.limit or "")
            raise admission.refusal
        record.charge = admission.charge

    def _begin_attempt(
        self, deployment: Deployment, inbound: Inbound, record: RequestRecord
    ) -> UpstreamCall:
        record.deployment = deployment
        record.attempts += 1
        record.headers["x-upstream-attempts"] = str(record.attempts)
        record.headers["x-upstream-deployment"] = deployment.name
        record.attempt = record.trace.attempt(
            deployment.name, record.attempts, endpoint=deployment.endpoint
        )
        record.call = UpstreamCall(inbound.request_id, trace_headers=record.attempt.inject())
        return record.call

    def _attempt_succeeded(
        self, plan: FailoverPlan | None, deployment: Deployment, record: RequestRecord
    ) -> None:
        self.metrics.count_attempt(deployment.name, "ok")
        self.recent_attempts.count(deployment.name, failed=False)
        if plan is not None:
            plan.succeeded(deployment)

    def _attempt_failed(
        self,
        plan: FailoverPlan | None,
        deployment: Deployment,
        error: GatewayError,
        record: RequestRecord,
    ) -> None:
        """Count a failed attempt, keep Azure's remaining counts from its answer, end its
        span; with a `plan`, raise `error` unless another attempt follows."""
        self.metrics.count_attempt(deployment.name, error.code)
        self.recent_attempts.count(deployment.name, failed=error.retryable)
        if error.upstream_headers:
            self.board.observe(deployment.name, error.upstream_headers)
        failover = plan is None
        try:
            if plan is not None:
                plan.failed(deployment, error)
                failover = True
        finally:
            record.attempt.failed(error.code, status=error.upstream_status, failover=failover)
            record.attempt.end(error.upstream_status)

    async def complete(
        self,
        face: Face,
        target: UpstreamTarget,
        body: UpstreamBody | None,
        candidates: tuple[Deployment, ...],
        inbound: Inbound,
        record: RequestRecord,
        tokens: int = 0,
        held: str | None = None,
    ) -> Answer:
        """A non-stream answer, from the first attempt that succeeds."""
        plan = self.failover.plan(candidates, tokens, pinned=held is not None)
        while not record.caller_gone:
            deployment = await plan.next_deployment()
            call = self._begin_attempt(deployment, inbound, record)
            encoded = (
                None if body is None else body.for_deployment(deployment, face.operation, False)
            )
            try:
                with self.board.in_flight(deployment.name):
                    response = await self.upstream.complete(
                        deployment, target, encoded, call, parse=face.usage_in_body is None
                    )
            except GatewayError as error:
                if held is not None:
                    error = await self._held_error(face, held, deployment, error)
                self._attempt_failed(plan, deployment, error, record)
                continue
            self._attempt_succeeded(plan, deployment, record)
            if response is None:
                record.attempt.end()
                break
            await self.holders.remember(
                face, response.document, None if body is None else body.body, deployment
            )
            if held is not None and face.method == "DELETE":
                await self.affinity.forget(held)
            return await self._answered(face, response, record)
        raise GatewayError(499, "client_closed_request", "The caller went away.")

    async def probe(
        self,
        face: Face,
        target: UpstreamTarget,
        response_id: str,
        candidates: tuple[Deployment, ...],
        inbound: Inbound,
        record: RequestRecord,
    ) -> Answer:
        """A request for an id no deployment is recorded for, asked of each candidate in
        turn: the first that answers it holds the response (gateway/holders.py)."""
        failure: GatewayError | None = None
        for deployment in candidates:
            call = self._begin_attempt(deployment, inbound, record)
            try:
                with self.board.in_flight(deployment.name):
                    response = await self.upstream.complete(deployment, target, None, call)
            except GatewayError as error:
                if error.upstream_status == 404:
                    self.metrics.count_attempt(deployment.name, NOT_HELD)
                    continue
                self._attempt_failed(None, deployment, error, record)
                failure = error
                continue
            self._attempt_succeeded(None, deployment, record)
            if response is None:
                raise GatewayError(499, "client_closed_request", "The caller went away.")
            if face.method != "DELETE":
                await self.affinity.record(response_id, deployment.name)
            return await self._answered(face, response, record)
        raise failure or response_not_found(response_id)

    async def _held_error(
        self, face: Face, response_id: str, deployment: Deployment, error: GatewayError
    ) -> GatewayError:
        """A 404 from the deployment holding a response means the response is gone (deleted,
        expired): that is the caller's answer, not a misconfigured deployment."""
        if error.upstream_status != 404 or face.reads_body:
            return error
        await self.affinity.forget(response_id)
        return response_not_found(response_id, deployment, error)

    async def _answered(
        self, face: Face, response: UpstreamResponse, record: RequestRecord
    ) -> Answer:
        if record.deployment is not None:
            self.board.observe(record.deployment.name, response.headers)
        record.upstream_status = response.status
        record.pass_on_headers(response.headers)
        if face.usage_in_body is not None:
            record.usage = face.usage_in_body(response.body)
        else:
            record.usage = face.usage_in_answer(response.document)
        record.attempt.set_upstream_request_id(record.apim_request_id)
        genai.describe_answer(record.attempt, response.document, record.usage)
        record.attempt.end(response.status)
        await self.account(record)
        return Answer(
            headers={"Content-Type": face.content_type},
            body=face.wrap_success(response.body, response.document),
        )

    async def stream(
        self,
        face: Face,
        target: UpstreamTarget,
        body: UpstreamBody | None,
        candidates: tuple[Deployment, ...],
        inbound: Inbound,
        record: RequestRecord,
        tokens: int = 0,
        held: str | None = None,
    ) -> Answer:
        """A stream, from the first attempt whose first events arrive."""
        caller_asked_usage = body is not None and caller_wants_stream_usage(body.body)
        plan = self.failover.plan(candidates, tokens, pinned=held is not None)
        while not record.caller_gone:
            deployment = await plan.next_deployment()
            call = self._begin_attempt(deployment, inbound, record)
            ask_usage = (
                face.adds_stream_usage
                and not caller_asked_usage
                and supports_stream_usage(deployment.api_version)
            )
            in_flight = ExitStack()  # until the stream ends, in `_stream_chunks`
            in_flight.enter_context(self.board.in_flight(deployment.name))
            try:
                stream = await self.upstream.open_stream(
                    deployment,
                    target,
                    None
                    if body is None
                    else body.for_deployment(deployment, face.operation, ask_usage),
                    call,
                    ends_stream=face.ends_stream,
                )
            except GatewayError as error:
                in_flight.close()
                self._attempt_failed(plan, deployment, error, record)
                continue
            except BaseException:
                in_flight.close()
                raise
            self._attempt_succeeded(plan, deployment, record)
            if stream is None:
                in_flight.close()
                record.attempt.end()
                break
            record.upstream_status = 200
            record.first_event_at = time.time()
            record.attempt.first_token()
            record.pass_on_headers(stream.headers)
            self.board.observe(deployment.name, stream.headers)
            record.attempt.set_upstream_request_id(record.apim_request_id)
            chunks = self._stream_chunks(
                face, stream, record, body, in_flight, drop_usage_event=ask_usage
            )
            return Answer(headers=dict(STREAM_HEADERS), stream=chunks)
        raise GatewayError(499, "client_closed_request", "The caller went away.")

    async def _stream_chunks(
        self,
        face: Face,
        stream: EventStream,
        record: RequestRecord,
        body: UpstreamBody | None,
        in_flight: ExitStack,
        *,
        drop_usage_event: bool,
    ) -> AsyncIterator[bytes]:
        """Azure's events as they came, one chunk per step; the usage event we asked for
        left out; a created response's deployment recorded; a keep-alive comment in each
        silence of `STREAM_KEEPALIVE` seconds; a failure after the start as the face's last
        error event."""
        self.metrics.streams_in_flight.inc()
        last_event: bytes | None = None
        unrecorded = face.records_response
        reading = genai.read_stream(record.attempt)
        try:
            async for events in stream:
                if not events:  # Azure silent for STREAM_KEEPALIVE seconds
                    yield KEEPALIVE_COMMENT
                    continue
                if reading is not None:
                    reading.read_events(events)
                if unrecorded and record.deployment is not None:
                    for event in events:
                        created = created_response(event)
                        if created is not None:
                            unrecorded = False
                            await self.holders.remember(
                                face,
                                created,
                                None if body is None else body.body,
                                record.deployment,
                            )
                            break
                for event in events:
                    usage = face.usage_in_event(event)
                    if usage is not None:
                        record.usage = usage
                        if drop_usage_event:
                            events = [kept for kept in events if kept is not event]
                        break
                if events:
                    last_event = events[-1]
                    chunk = events[0] if len(events) == 1 else b"".join(events)
                    events = []  # only the chunk is held while the caller takes it
                    yield chunk
        except GatewayError as error:
            record.error_code = error.code
            record.attempt.failed(error.code)
            yield face.stream_error(error, last_event)
        finally:
            stream.close()
            in_flight.close()
            self.metrics.streams_in_flight.dec()
            if reading is not None:
                reading.report(record.usage)
            record.attempt.end(200)
            await self.account(record)

    async def account(self, record: RequestRecord) -> None:
        """Settle the answer's tokens and cost: the key's window and budgets, the usage
        report and the metrics. Without a usage figure the estimate stays charged."""
        if not record.usage or record.deployment is None:
            return
        deployment = record.deployment
        usage = TokenUsage.from_usage(record.usage)
        cost = cost_usd(usage, deployment.price)
        self.metrics.count_tokens(
            record.key_name, deployment.name, usage.input_tokens, usage.output_tokens
        )
        if deployment.price is not None:
            self.metrics.count_cost(record.key_name, deployment.name, cost)
        await self.quota.record_usage(
            record.key_name, record.caller, deployment.name, usage, cost, record.charge
        )
