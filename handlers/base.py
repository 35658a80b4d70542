"""What every route shares: security headers, CORS, request limits, JSON bodies and the error shape.

Every handler reads its own body (`stream_request_body`), so the limits are
applied as soon as the headers are in, with an answer in the route's error
shape: a header block over MAX_HEADER_SIZE gets a 431, a body that does not
arrive within BODY_TIMEOUT a 408, and a route that takes no JSON body refuses
one over MAX_OTHER_BODY_SIZE with a 413 at once, without reading it. Each of
these closes the connection after the answer (`Connection: close`): the rest
of the request may still be on its way.
"""

from __future__ import annotations

import json
from typing import Any

from tornado.ioloop import IOLoop
from tornado.web import HTTPError, RequestHandler, stream_request_body

from gateway.accesslog import timestamp
from gateway.context import GatewayContext
from gateway.errors import GatewayError, render_envelope
from gateway.jsonbody import ParsedBody, parse_body

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
# Every response's constant headers, in the order they are sent. Written
# straight into the response's HTTPHeaders: set_header's per-value check is
# for values that come from outside, these are fixed here.
DEFAULT_HEADERS = tuple(SECURITY_HEADERS.items())
DEFAULT_HEADERS_HTTPS = (*DEFAULT_HEADERS, ("Strict-Transport-Security", HSTS))
CORS_METHODS = "GET,HEAD,PUT,PATCH,POST,DELETE"


@stream_request_body
class BaseHandler(RequestHandler):
    """Headers, request limits and the error body of the original `{"success": ...}` family."""

    # The route's name in the access log and metrics.
    route = "other"
    _body_timer: object | None = None

    def prepare(self) -> None:
        settings = self.context.settings
        self._received = 0
        self._body_timer = IOLoop.current().call_later(settings.body_timeout, self._body_timed_out)
        # Tornado 6.6.1 resolves this private future once the whole body is in
        # (RequestHandler._execute awaits it); it is the only signal of that.
        self.request._body_future.add_done_callback(lambda _: self._disarm_body_timer())
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
        return self.context.settings.max_other_body_size

    def _refuse_body(self, size: int) -> None:
        """Answer a declared body over the limit at once, before any of it is read."""
        # Tornado discards what arrives until it closes the connection, once the
        # answer is written; its own limit is raised to the declared length, as
        # past that it would write a bare 400 after our answer.
        self.request.connection.set_max_body_size(max(size, self.body_limit()))
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
                    f"{self.context.settings.body_timeout:g} s.",
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
    def context(self) -> GatewayContext:
        # From the application, not initialize(): set_default_headers needs it
        # and Tornado calls that before initialize().
        return self.application.settings["context"]

    def set_default_headers(self) -> None:
        # Tornado's clear() calls this for every response, and again when
        # send_error starts an error response over, so errors carry them too.
        self.clear_header("Server")
        headers = self._headers
        https = self.request.protocol == "https"
        for name, value in DEFAULT_HEADERS_HTTPS if https else DEFAULT_HEADERS:
            headers[name] = value
        self._set_cors_headers()

    def _set_cors_headers(self) -> None:
        origins = self.context.settings.cors_origins
        if "*" in origins:
            self._headers["Access-Control-Allow-Origin"] = "*"
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
        self.finish(json.dumps(payload, separators=(",", ":")))

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
            return GatewayError(error.status_code, "bad_request", error.log_message or self._reason)
        return GatewayError(500, "internal_error", "The gateway failed unexpectedly.")

    def render_error(self, error: GatewayError) -> dict[str, Any]:
        return render_envelope(error)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The one place an error response body is shaped."""
        error = self.gateway_error(kwargs.get("exc_info"))
        self.set_status(error.status)
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.write_json(self.render_error(error))

    def access_record(self) -> dict[str, Any]:
        """What the access log line says about this request."""
        return {
            "time": timestamp(self.request._start_time),
            "request_id": self._headers.get("x-request-id"),
            "method": self.request.method,
            "route": self.route,
            "path": self.request.path,
            "status": self.get_status(),
            "duration_ms": round(self.request.request_time() * 1000, 2),
        }

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Expected failures are the caller's or Azure's, not a bug: no traceback.
        if isinstance(value, GatewayError):
            return
        super().log_exception(typ, value, tb)


class NotFoundHandler(BaseHandler):
    """Every path no route claims (after its body, so the connection stays usable)."""

    route = "not_found"

    def get(self, *_args: str) -> None:
        raise GatewayError(404, "not_found", "API Not found.")

    head = post = put = patch = delete = get


class JsonBodyHandler(BaseHandler):
    """Reads a JSON body itself, so an oversized one gets a 413 answer, not a dropped connection.

    An oversized body is still read to its end (and dropped): answering
    before that would make Tornado close a socket with unread data, which
    resets the connection and can destroy the 413 before the caller reads it.
    """

    def prepare(self) -> None:
        self._chunks: list[bytes] = []
        super().prepare()

    def body_limit(self) -> int:
        return self.context.settings.max_body_size

    def _refuse_body(self, size: int) -> None:
        """Read an oversized body to its end all the same (see the class docstring)."""

    def data_received(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received <= self.context.settings.max_body_size:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()

    def json_body(self) -> ParsedBody:
        """The body, a JSON object, or a 4xx naming what is wrong with it (gateway/jsonbody.py)."""
        settings = self.context.settings
        if self._received > settings.max_body_size:
            raise GatewayError(
                413,
                "body_too_large",
                f"The request body exceeds the limit of {settings.max_body_size} bytes.",
            )
        content_type = self.request.headers.get("Content-Type", "application/json")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise GatewayError(
                415,
                "unsupported_media_type",
                f"Content-Type {media_type or '(empty)'} is not supported; "
                "send the body as application/json.",
            )
        body = parse_body(b"".join(self._chunks), max_depth=settings.max_json_depth)
        if not isinstance(body.document, dict):
            raise GatewayError(400, "invalid_json", "The request body must be a JSON object.")
        return body


def header_block_size(request: Any) -> int:
    """About the size of the request line and header block as sent, re-counted from the parse."""
    size = len(request.method) + len(request.uri) + len(request.version) + 4
    for name, value in request.headers.get_all():
        size += len(name) + len(value) + 4
    return size


def closing_error(status: int, code: str, message: str) -> GatewayError:
    """An error answered before the request was read to its end: the connection closes after it."""
    return GatewayError(status, code, message, headers={"Connection": "close"})
