"""Chat-completion routes: validate, build the upstream body, relay the answer."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Mapping

from tornado.httputil import HTTPHeaders

from gateway.chat import build_gpt_chat_body
from gateway.config import Deployment
from gateway.errors import GatewayError, render_envelope
from gateway.sse import encode_event
from gateway.upstream import UpstreamCall, UpstreamResponse
from gateway.validation import validate_body

from .base import JsonBodyHandler

# A caller-supplied request id is echoed and logged, so it must be short and plain.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Upstream response headers worth passing to the caller.
RELAYED_HEADERS = ("apim-request-id", "x-ms-region")


class ChatProxyHandler(JsonBodyHandler):
    """Shared by every chat route: upstream attempts with failover, streamed or not,
    stopped if the caller leaves."""

    call: UpstreamCall | None = None
    deployment: Deployment | None = None
    caller_gone = False
    attempts = 0
    upstream_status: int | None = None
    apim_request_id: str | None = None
    first_event_at: float | None = None

    def prepare(self) -> None:
        super().prepare()
        self.context.in_flight.enter()
        self._counted = True
        supplied = self.request.headers.get("x-request-id", "")
        self.request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        self.set_header("x-request-id", self.request_id)

    def on_finish(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.context.in_flight.leave()

    def on_connection_close(self) -> None:
        self.caller_gone = True
        if self.call is not None:
            self.call.abort("client_gone")
        self.on_finish()

    def unknown_model(self, model: str | None) -> GatewayError:
        return GatewayError(
            404, "model_not_found", f"No deployment serves the model {model!r}.", param="model"
        )

    async def relay(self, payload: bytes, *, stream: bool, model: str | None) -> None:
        """Send `payload` to a deployment serving `model` and relay the answer in this route's shape."""
        candidates = self.context.pool.candidates(model)
        if not candidates:
            raise self.unknown_model(model)

        async def attempt(deployment: Deployment) -> UpstreamResponse | None:
            self.deployment = deployment
            self.attempts += 1
            self.set_header("x-upstream-attempts", str(self.attempts))
            self.call = UpstreamCall(self.request_id)
            if stream:
                await self.context.upstream.stream(deployment, payload, self.call, self)
                return None
            return await self.context.upstream.complete(deployment, payload, self.call)

        response = await self.context.failover.run(
            candidates, attempt, cancelled=lambda: self.caller_gone
        )
        if self.caller_gone:
            return
        if response is not None:
            self.upstream_status = response.status
            self._relay_headers(response.headers)
            self.write_completion(response)
        else:
            self.finish()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # send_error cleared the headers set so far; these belong on errors too.
        self.set_header("x-request-id", self.request_id)
        if self.attempts:
            self.set_header("x-upstream-attempts", str(self.attempts))
        error = self.gateway_error(kwargs.get("exc_info"))
        self.upstream_status = error.upstream_status
        if error.upstream_headers:
            self._relay_headers(error.upstream_headers)
        super().write_error(status_code, **kwargs)

    def access_record(self) -> dict[str, Any]:
        record = super().access_record()
        record.update(
            deployment=self.deployment.name if self.deployment else None,
            upstream_status=self.upstream_status,
            attempts=self.attempts or None,
            apim_request_id=self.apim_request_id,
        )
        if self.first_event_at is not None:
            record["ttft_ms"] = round((self.first_event_at - self.request._start_time) * 1000, 2)
        if self.caller_gone:
            record["status"] = 499
        return record

    def write_completion(self, response: UpstreamResponse) -> None:
        raise NotImplementedError

    def stream_error_payload(self, error: GatewayError) -> dict[str, Any]:
        raise NotImplementedError

    def _relay_headers(self, upstream_headers: Mapping[str, str]) -> None:
        for name in RELAYED_HEADERS:
            if name in upstream_headers:
                self.set_header(name, upstream_headers[name])
        self.apim_request_id = upstream_headers.get("apim-request-id")

    # StreamSink: called by UpstreamClient.stream as Azure's events arrive.

    def start(self, upstream_headers: HTTPHeaders) -> None:
        self.upstream_status = 200
        self.first_event_at = time.time()
        self._relay_headers(upstream_headers)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")

    def send(self, event: bytes) -> None:
        self.write(event)
        self.flush()

    def fail(self, error: GatewayError) -> None:
        self.write(encode_event(self.stream_error_payload(error)))
        self.flush()


class GptChatHandler(ChatProxyHandler):
    """POST /v1/gpt/chat: the original service's contract."""

    route = "gpt_chat"

    async def post(self) -> None:
        request = self.json_body()
        validate_body(self.context.validators["gpt_chat"], request)
        body = build_gpt_chat_body(request, self.context.settings.parameter_defaults)
        await self.relay(
            json.dumps(body, separators=(",", ":")).encode(),
            stream=bool(body.get("stream")),
            model=None,
        )

    def write_completion(self, response: UpstreamResponse) -> None:
        self.write_json({"success": 1, **json.loads(response.body)})

    def stream_error_payload(self, error: GatewayError) -> dict[str, Any]:
        return render_envelope(error)
