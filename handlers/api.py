"""The one handler of every API route, given its face, and GET /v1/models.

`ApiHandler` hands the request to the pipeline (gateway/pipeline.py)
and writes what comes back: one body, or a stream pulled chunk by chunk,
each written and flushed before the next is read, so a caller that reads
slowly holds Azure back instead of filling the gateway's memory.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from contextlib import aclosing
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.web import HTTPError

from gateway.faces import OPENAI_CHAT, Face, unknown_model
from gateway.ops.genai import route_template
from gateway.pipeline import Answer, Inbound, RequestRecord

from .base import BaseHandler, BodyReadingHandler
from .listeners import request_start_time, set_nodelay

# A caller-supplied request id is echoed and logged, so it must be short and plain.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ApiHandler(BodyReadingHandler):
    """An API route: the face says which API it is (gateway/faces.py), and its method.

    A path served by two faces (`GET` and `DELETE /responses/{id}`) names the
    second as `delete_face`.
    """

    def initialize(self, face: Face, delete_face: Face | None = None) -> None:
        self.face = face
        self.route = face.route
        self._delete_face = delete_face

    def prepare(self) -> None:
        super().prepare()
        if self.request.method == "DELETE" and self._delete_face is not None:
            self.face = self._delete_face
            self.route = self.face.route
        self.pipeline.in_flight.enter()
        self._counted = True
        supplied = self.request.headers.get("x-request-id", "")
        self.request_id = supplied if _REQUEST_ID.match(supplied) else secrets.token_hex(16)
        tracer = self.pipeline.tracer
        route = route_template(self.request.path, self.path_args) if tracer.enabled else ""
        self.record = RequestRecord(
            headers={"x-request-id": self.request_id},
            trace=tracer.request(self.request.method or "POST", route, self.request.headers),
        )
        self.set_header("x-request-id", self.request_id)

    async def post(self, *path_args: str) -> None:
        await self.serve(path_args)

    async def get(self, *path_args: str) -> None:
        await self.serve(path_args)

    async def delete(self, *path_args: str) -> None:
        await self.serve(path_args)

    async def serve(self, path_args: tuple[str, ...]) -> None:
        # Refused here, once the body is in, not in prepare(): an answer before the
        # body would leave it unread, and closing on unread bytes resets the connection.
        if self.request.method != self.face.method:
            raise HTTPError(405)
        inbound = Inbound(
            request_id=self.request_id,
            headers=self.request.headers,
            body=self.body(),
            body_size=self._received,
            path_args=path_args,
            query=self.request.query,
        )
        answer = await self.pipeline.run(self.face, inbound, self.record)
        for name, value in (*self.record.headers.items(), *answer.headers.items()):
            self.set_header(name, value)
        if answer.stream is None:
            self.finish(answer.body)
        else:
            await self.write_stream(answer)

    async def write_stream(self, answer: Answer) -> None:
        """Write the stream as it is pulled; stop pulling when the caller goes away."""
        set_nodelay(self.request)
        async with aclosing(answer.stream) as chunks:  # type: ignore[type-var]
            async for chunk in chunks:
                self.write(chunk)
                try:
                    await self.flush()
                except StreamClosedError:
                    self.record.caller_left()
                    break
        if not self.record.caller_gone:
            self.finish()

    def on_finish(self) -> None:
        super().on_finish()
        if getattr(self, "_counted", False):
            self._counted = False
            self.pipeline.in_flight.leave()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        if self._finished:
            return  # answered already (a 408 or 413 before the body was in), not gone
        self.record.caller_left()
        self.on_finish()

    def answer_headers(self) -> dict[str, str]:
        # send_error cleared the headers set so far; these belong on errors too.
        return getattr(self, "record", RequestRecord()).headers

    def end_trace(self, access: Mapping[str, Any]) -> None:
        """End the request's server span with what the access log says about it."""
        trace = self.record.trace
        trace.set_key(access.get("key"))
        trace.set_request_id(self.request_id)
        trace.end(access["status"], error_type=self.record.error_code)

    def access_record(self) -> dict[str, Any]:
        record = super().access_record()
        life = self.record
        record.update(
            request_id=self.request_id,
            key=life.caller.name if life.caller else None,
            deployment=life.deployment.name if life.deployment else None,
            upstream_status=life.upstream_status,
            attempts=life.attempts or None,
            apim_request_id=life.apim_request_id,
        )
        if life.usage:
            record["prompt_tokens"] = life.usage.get("prompt_tokens")
            record["completion_tokens"] = life.usage.get("completion_tokens")
        if life.first_event_at is not None:
            record["ttft_ms"] = round(
                (life.first_event_at - request_start_time(self.request)) * 1000, 2
            )
        if life.caller_gone:
            record["status"] = 499
        return record


class ModelsHandler(BaseHandler):
    """GET /v1/models[/{id}] (and /openai/v1/models): the names this server serves, in
    OpenAI's shape; a caller's key sees only the models it may use."""

    route = "models"
    face = OPENAI_CHAT

    async def get(self, model: str | None = None) -> None:
        caller = await self.pipeline.callers.authenticate(self.request.headers)
        visible = self.pipeline.visible_models(caller)
        if model is None:
            self.write_json({"object": "list", "data": [model_object(name) for name in visible]})
        elif model in visible:
            self.write_json(model_object(model))
        else:
            raise unknown_model(model, visible)


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "azure-gpt-api"}
