"""Chat-completion routes: authenticate, validate, admit, relay the answer, account for it."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any, Mapping

from tornado.httputil import HTTPHeaders

from gateway.chat import (
    build_gpt_chat_body,
    caller_wants_stream_usage,
    supports_stream_usage,
    with_stream_usage,
)
from gateway.deployments import Deployment
from gateway.errors import GatewayError, render_envelope
from gateway.jsonbody import encode_body
from gateway.keys import CallerKey
from gateway.quota import ANONYMOUS
from gateway.sse import encode_event, usage_in
from gateway.upstream import UpstreamCall, UpstreamResponse

from .base import JsonBodyHandler

# A caller-supplied request id is echoed and logged, so it must be short and plain.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Upstream response headers worth passing to the caller.
RELAYED_HEADERS = ("apim-request-id", "x-ms-region")


class ChatProxyHandler(JsonBodyHandler):
    """Shared by every chat route.

    `post` is the whole life of a request: the caller's key, the body, the
    route's checks (`upstream_body`), the key's quota, the upstream attempts
    with failover, the answer in the route's shape, the usage accounting.
    """

    call: UpstreamCall | None = None
    caller: CallerKey | None = None
    deployment: Deployment | None = None
    caller_gone = False
    attempts = 0
    upstream_status: int | None = None
    apim_request_id: str | None = None
    first_event_at: float | None = None
    usage: dict[str, Any] | None = None
    # Response headers that survive send_error's clear(): request id, quota.
    sticky_headers: dict[str, str]

    def prepare(self) -> None:
        super().prepare()
        self.context.in_flight.enter()
        self._counted = True
        self.sticky_headers = {}
        supplied = self.request.headers.get("x-request-id", "")
        self.request_id = supplied if _REQUEST_ID.match(supplied) else secrets.token_hex(16)
        self.set_sticky_header("x-request-id", self.request_id)

    def set_sticky_header(self, name: str, value: str) -> None:
        self.sticky_headers[name] = value
        self.set_header(name, value)

    def on_finish(self) -> None:
        super().on_finish()
        if getattr(self, "_counted", False):
            self._counted = False
            self.context.in_flight.leave()
            if self.first_event_at is not None:
                self.context.metrics.streams_in_flight.dec()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        if self._finished:
            return  # answered already (a 408 or 413 before the body was in), not gone
        self.caller_gone = True
        if self.call is not None:
            self.call.abort("client_gone")
        self.on_finish()

    def upstream_body(self, request: dict[str, Any], *path_args: str) -> tuple[dict[str, Any], str | None]:
        """Check `request` for this route; return the upstream body and the model asked for."""
        raise NotImplementedError

    def unknown_model(self, model: str | None) -> GatewayError:
        return GatewayError(
            404, "model_not_found", f"No deployment serves the model {model!r}.", param="model"
        )

    async def post(self, *path_args: str) -> None:
        self.caller = self.context.keyring.authenticate(self.request.headers)
        request = self.json_body()
        body, model = self.upstream_body(request.document, *path_args)
        candidates = self.allowed_candidates(model)
        await self.admit()
        as_sent = request.encoded if body is request.document else None
        response = await self.relay(body, as_sent, candidates)
        if response is not None:
            self.usage = response.document.get("usage")
            self.upstream_status = response.status
            self._relay_headers(response.headers)
            self.write_completion(response)
        elif not self.caller_gone:
            self.finish()
        await self.account()

    def allowed_candidates(self, model: str | None) -> tuple[Deployment, ...]:
        """Deployments serving `model` that the caller's key may use.

        A key's `models` name deployments by any of their names, so asking for
        a deployment by its alias is the same as asking by its model name.
        """
        candidates = self.context.pool.candidates(model)
        if not candidates:
            raise self.unknown_model(model)
        allowed = self.caller.models if self.caller else None
        if allowed is None:
            return candidates
        usable = tuple(d for d in candidates if {d.name, d.deployment, *d.models} & set(allowed))
        if not usable:
            self.context.keyring.check_model(self.caller, [model] if model else [])
        return usable

    async def admit(self) -> None:
        """Count the request against its key's quota; 429 without calling Azure when over."""
        if self.caller is None:
            return
        admission = await self.context.quota.admit(self.caller)
        for name, value in admission.headers.items():
            self.set_sticky_header(name, value)
        if not admission.allowed:
            self.context.metrics.count_quota_rejection(self.caller.name, admission.limit)
            raise GatewayError(
                429,
                "rate_limit_exceeded",
                f"The key {self.caller.name!r} is over its {admission.limit}-per-minute limit; "
                f"retry after {admission.retry_after} s.",
            )

    async def relay(
        self, body: dict[str, Any], as_sent: bytes | None, candidates: tuple[Deployment, ...]
    ) -> UpstreamResponse | None:
        """Send `body` to one of `candidates`, failing over by the routing rules.

        `as_sent`: `body` is the caller's own, already encoded (by the strict
        reader, from the document it checked). A stream is relayed to the
        caller as it arrives (None is returned); a non-stream answer is
        returned for the route to shape.
        """
        stream = bool(body.get("stream"))
        self.wants_stream_usage = caller_wants_stream_usage(body)
        encoded: dict[bool, bytes] = {}

        def payload(ask_usage: bool) -> bytes:
            """The upstream bytes, made once each: with our usage request, or as given."""
            if ask_usage not in encoded:
                if ask_usage:
                    encoded[ask_usage] = encode_body(with_stream_usage(body))
                else:
                    encoded[ask_usage] = as_sent if as_sent is not None else encode_body(body)
            return encoded[ask_usage]

        async def attempt(deployment: Deployment) -> UpstreamResponse | None:
            self.deployment = deployment
            self.attempts += 1
            self.set_sticky_header("x-upstream-attempts", str(self.attempts))
            self.call = UpstreamCall(self.request_id)
            upstream = self.context.upstream
            if not stream:
                return await upstream.complete(deployment, payload(False), self.call)
            ask_usage = not self.wants_stream_usage and supports_stream_usage(deployment.api_version)
            await upstream.stream(deployment, payload(ask_usage), self.call, self)
            return None

        return await self.context.failover.run(
            candidates,
            attempt,
            on_attempt=self.context.count_attempt,
            cancelled=lambda: self.caller_gone,
        )

    async def account(self) -> None:
        """Add the answer's tokens to the usage report, the key's token quota and the metrics."""
        if not self.usage or self.deployment is None:
            return
        name = self.caller.name if self.caller else ANONYMOUS
        prompt = int(self.usage.get("prompt_tokens") or 0)
        completion = int(self.usage.get("completion_tokens") or 0)
        self.context.metrics.count_tokens(name, self.deployment.name, prompt, completion)
        await self.context.quota.record_usage(
            name, self.caller, self.deployment.name, prompt, completion
        )

    def write_completion(self, response: UpstreamResponse) -> None:
        """Answer with Azure's non-stream completion."""
        raise NotImplementedError

    def stream_error_payload(self, error: GatewayError) -> dict[str, Any]:
        raise NotImplementedError

    def _relay_headers(self, upstream_headers: Mapping[str, str]) -> None:
        for name in RELAYED_HEADERS:
            if name in upstream_headers:
                self.set_header(name, upstream_headers[name])
        self.apim_request_id = upstream_headers.get("apim-request-id")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # send_error cleared the headers set so far; these belong on errors too.
        for name, value in getattr(self, "sticky_headers", {}).items():
            self.set_header(name, value)
        error = self.gateway_error(kwargs.get("exc_info"))
        self.upstream_status = error.upstream_status
        if error.upstream_headers:
            self._relay_headers(error.upstream_headers)
        super().write_error(status_code, **kwargs)

    def access_record(self) -> dict[str, Any]:
        record = super().access_record()
        record.update(
            key=self.caller.name if self.caller else None,
            deployment=self.deployment.name if self.deployment else None,
            upstream_status=self.upstream_status,
            attempts=self.attempts or None,
            apim_request_id=self.apim_request_id,
        )
        if self.usage:
            record["prompt_tokens"] = self.usage.get("prompt_tokens")
            record["completion_tokens"] = self.usage.get("completion_tokens")
        if self.first_event_at is not None:
            record["ttft_ms"] = round((self.first_event_at - self.request._start_time) * 1000, 2)
        if self.caller_gone:
            record["status"] = 499
        return record

    # StreamSink: called by UpstreamClient.stream as Azure's events arrive.

    def start(self, upstream_headers: HTTPHeaders) -> None:
        self.upstream_status = 200
        self.first_event_at = time.time()
        self.context.metrics.streams_in_flight.inc()
        self._relay_headers(upstream_headers)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        # Small writes must not wait for the caller's delayed ACK (Nagle): with
        # events 10 ms apart that held some back by ~40 ms.
        self.request.connection.stream.set_nodelay(True)

    def send(self, events: list[bytes]) -> None:
        for event in events:
            usage = usage_in(event)
            if usage is not None:
                self.usage = usage
                if not self.wants_stream_usage:
                    events = [kept for kept in events if kept is not event]
                    break  # asked for our accounting, not by the caller
        if events:
            self.write(events[0] if len(events) == 1 else b"".join(events))
            self.flush()

    def fail(self, error: GatewayError) -> None:
        self.write(encode_event(self.stream_error_payload(error)))
        self.flush()


class GptChatHandler(ChatProxyHandler):
    """POST /v1/gpt/chat: the original service's contract."""

    route = "gpt_chat"

    def upstream_body(self, request: dict[str, Any], *path_args: str) -> tuple[dict[str, Any], str | None]:
        self.context.validators["gpt_chat"].validate(request)
        return build_gpt_chat_body(request, self.context.settings.parameter_defaults), None

    def write_completion(self, response: UpstreamResponse) -> None:
        # Azure's object with "success": 1 in front, spliced rather than re-encoded.
        body = response.body.lstrip()
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(b'{"success":1,' + body[1:] if response.document else b'{"success":1}')

    def stream_error_payload(self, error: GatewayError) -> dict[str, Any]:
        return render_envelope(error)
