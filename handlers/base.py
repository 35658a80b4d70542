"""What every route shares: security headers, CORS, request limits, the body and error answers.

Every handler reads its own body (`stream_request_body`), so the limits are
applied as soon as the headers are in, with an answer in the route's error
shape: a header block over MAX_HEADER_SIZE gets a 431, a body that does not
arrive within BODY_TIMEOUT a 408, and a route that takes no JSON body refuses
one over MAX_OTHER_BODY_SIZE with a 413 at once, without reading it. Each of
these closes the connection after the answer (`Connection: close`): the rest
of the request may still be on its way.
"""

from __future__ import annotations

from typing import Any

from tornado.httputil import HTTPServerRequest, responses
from tornado.ioloop import IOLoop
from tornado.web import HTTPError, RequestHandler, stream_request_body

from gateway.encoding import compact_json
from gateway.errors import GatewayError
from gateway.faces import GPT_CHAT, Face
from gateway.ops.accesslog import timestamp
from gateway.pipeline import Pipeline

from .listeners import request_start_time, set_constant_headers, when_body_received

# What the original's helmet() set that still means something for a JSON API.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-DNS-Prefetch-Control": "off",
    "X-Download-Options": "noopen",
    "X-Permitted-Cross-Domain-Policies": "none",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}
HSTS = "max-age=15552000; includeSubDomains"
# Every response's constant headers, in the order they are sent.
DEFAULT_HEADERS = tuple(SECURITY_HEADERS.items())
DEFAULT_HEADERS_HTTPS = (*DEFAULT_HEADERS, ("Strict-Transport-Security", HSTS))
CORS_METHODS = "GET,HEAD,PUT,PATCH,POST,DELETE"


def access_record(handler: RequestHandler, route: str) -> dict[str, Any]:
    """What the access log line says about any request."""
    return {
        "time": timestamp(request_start_time(handler.request)),
        "request_id": None,
        "method": handler.request.method,
        "route": route,
        "path": handler.request.path,
        "status": handler.get_status(),
        "duration_ms": round(handler.request.request_time() * 1000, 2),
    }


@stream_request_body
class BaseHandler(RequestHandler):
    """Headers, request limits, and error answers in the shape of the handler's face.

    `write_error` is the one place an error response is written; the body
    comes from the face (the original API's `{"success": 0, ...}` unless the
    route belongs to another family).
    """

    # The route's name in the access log and metrics.
    route = "other"
    face: Face = GPT_CHAT
    _body_timer: object | None = None

    def prepare(self) -> None:
        settings = self.pipeline.settings
        self._received = 0
        self._body_timer = IOLoop.current().call_later(settings.body_timeout, self._body_timed_out)
        when_body_received(self.request, self._disarm_body_timer)
        size = header_block_size(self.request)
        if size > settings.max_header_size:
            raise closing_error(
                431,
                "headers_too_large",
                f"The request's header block ({size} bytes) exceeds the limit of "
                f"{settings.max_header_size} bytes.",
            )
        declared = self.request.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.body_limit():
            self._refuse_body(int(declared))

    def body_limit(self) -> int:
        """The largest body this route accepts; none of its own, so a small one."""
        return self.pipeline.settings.max_other_body_size

    def _refuse_body(self, size: int) -> None:
        """Answer a declared body over the limit at once, before any of it is read."""
        # Tornado discards what arrives until it closes the connection, once the
        # answer is written; its own limit is raised to the declared length, as
        # past that it would write a bare 400 after our answer.
        self.request.connection.set_max_body_size(max(size, self.body_limit()))  # type: ignore[union-attr]
        raise self._body_too_large()

    def _body_too_large(self) -> GatewayError:
        return closing_error(
            413,
            "body_too_large",
            f"This route takes no request body over {self.body_limit()} bytes.",
        )

    def data_received(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received > self.body_limit() and not self._finished:
            self.fail_now(self._body_too_large())  # a chunked body: no length was declared

    def fail_now(self, error: GatewayError) -> None:
        """Answer with `error` from outside the verb method (a timer, a body chunk)."""
        self.send_error(error.status, exc_info=(GatewayError, error, None))

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if not self._finished:
            self.fail_now(
                closing_error(
                    408,
                    "body_timeout",
                    "The request body did not arrive within "
                    f"{self.pipeline.settings.body_timeout:g} s.",
                )
            )

    def _disarm_body_timer(self) -> None:
        if self._body_timer is not None:
            IOLoop.current().remove_timeout(self._body_timer)
            self._body_timer = None

    def on_finish(self) -> None:
        self._disarm_body_timer()

    def on_connection_close(self) -> None:
        self._disarm_body_timer()
        super().on_connection_close()  # ends the wait for a body that will not come

    @property
    def pipeline(self) -> Pipeline:
        # From the application, not initialize(): set_default_headers needs it
        # and Tornado calls that before initialize().
        return self.application.settings["pipeline"]

    def set_default_headers(self) -> None:
        # Tornado's clear() calls this for every response, and again when
        # send_error starts an error response over, so errors carry them too.
        self.clear_header("Server")
        https = self.request.protocol == "https"
        set_constant_headers(self, DEFAULT_HEADERS_HTTPS if https else DEFAULT_HEADERS)
        self._set_cors_headers()

    def _set_cors_headers(self) -> None:
        origins = self.pipeline.settings.cors_origins
        if "*" in origins:
            set_constant_headers(self, (("Access-Control-Allow-Origin", "*"),))
            return
        origin = self.request.headers.get("Origin")
        if origin in origins:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.add_header("Vary", "Origin")

    def options(self, *_args: str) -> None:
        """Answer a CORS preflight as the `cors` package does."""
        self.set_header("Access-Control-Allow-Methods", CORS_METHODS)
        requested = self.request.headers.get("Access-Control-Request-Headers")
        if requested:
            self.set_header("Access-Control-Allow-Headers", requested)
            self.add_header("Vary", "Access-Control-Request-Headers")
        self.set_status(204)
        self.finish()

    def write_json(self, payload: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(compact_json(payload))

    def gateway_error(self, exc_info: Any) -> GatewayError:
        """The GatewayError behind a failure, whatever raised it."""
        error = exc_info[1] if exc_info else None
        if isinstance(error, GatewayError):
            return error
        if isinstance(error, HTTPError) and error.status_code == 405:
            return GatewayError(
                405,
                "method_not_allowed",
                f"Method {self.request.method} is not allowed on {self.request.path}.",
            )
        if isinstance(error, HTTPError) and error.status_code < 500:
            return GatewayError(
                error.status_code,
                "bad_request",
                error.log_message
                or error.reason
                or responses.get(error.status_code, "Bad Request"),
            )
        return GatewayError(500, "internal_error", "The gateway failed unexpectedly.")

    def answer_headers(self) -> dict[str, str]:
        """Headers an error answer keeps from the request's life so far (none here)."""
        return {}

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = self.gateway_error(kwargs.get("exc_info"))
        self.set_status(error.status)
        for name, value in (*self.answer_headers().items(), *error.headers.items()):
            self.set_header(name, value)
        self.write_json(self.face.render_error(error))

    def access_record(self) -> dict[str, Any]:
        """What the access log line says about this request."""
        return access_record(self, self.route)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Expected failures are the caller's or Azure's, not a bug: no traceback.
        if isinstance(value, GatewayError):
            return
        super().log_exception(typ, value, tb)


class NotFoundHandler(BaseHandler):
    """Every path no route claims (after its body, so the connection stays usable):
    the original's answer, naming what was asked for."""

    route = "not_found"

    def get(self, *_args: str) -> None:
        raise GatewayError(
            404,
            "not_found",
            f"No route for {self.request.method} {self.request.path}",
            summary="API Not found.",
        )

    head = post = put = patch = delete = get


class BodyReadingHandler(BaseHandler):
    """Keeps the body (up to MAX_BODY_SIZE), so an oversized one gets a 413 answer,
    not a dropped connection; the pipeline reads it (gateway/jsonbody.py).

    An oversized body is still read to its end (and dropped): answering
    before that would make Tornado close a socket with unread data, which
    resets the connection and can destroy the 413 before the caller reads it.
    """

    def prepare(self) -> None:
        self._chunks: list[bytes] = []
        super().prepare()

    def body_limit(self) -> int:
        return self.pipeline.settings.max_body_size

    def _refuse_body(self, size: int) -> None:
        """Read an oversized body to its end all the same (see the class docstring)."""

    def data_received(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received <= self.pipeline.settings.max_body_size:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()

    def body(self) -> bytes:
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)


def header_block_size(request: HTTPServerRequest) -> int:
    """About the size of the request line and header block as sent, re-counted from the parse."""
    size = len(request.method or "") + len(request.uri or "") + len(request.version) + 4
    for name, value in request.headers.get_all():
        size += len(name) + len(value) + 4
    return size


def closing_error(status: int, code: str, message: str) -> GatewayError:
    """An error answered before the request was read to its end: the connection closes after it."""
    return GatewayError(status, code, message, headers={"Connection": "close"})
