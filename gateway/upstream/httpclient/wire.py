"""HTTP/1.1 as the client writes and reads it: request heads, header lines, targets, proxies.

Plain functions and values, shared by the pool (pool.py) and its
connections (connection.py); nothing here holds state.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.httputil import HTTPHeaders, HTTPInputError


class HTTPTransportError(HTTPClientError):
    """No HTTP answer came: the connection failed, was lost or timed out, or the answer was garbled."""

    CONNECT = "connect"  # refused, unresolvable, TLS handshake or certificate failure
    TIMEOUT = "timeout"  # connect_timeout or request_timeout
    CLOSED = "closed"  # the server closed or reset the connection before the answer ended
    PROTOCOL = "protocol"  # not HTTP/1.x, a malformed head or framing, a body over the limit
    ABORTED = "aborted"  # abort(), or the client was closed

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(599, message)
        self.kind = kind


def parse_header_lines(lines: Iterable[str]) -> HTTPHeaders:
    """Header lines ("Name: value", without line ends) as HTTPHeaders.

    Twice as fast as `HTTPHeaders.parse`, which runs a regular expression
    over every line, and as strict: no folded lines, no stray CR or LF.
    """
    headers = HTTPHeaders()
    for line in lines:
        name, colon, value = line.partition(":")
        if (
            not colon
            or not name
            or name[-1] in " \t"
            or name[0] in " \t"
            or "\r" in line
            or "\n" in line
        ):
            raise HTTPInputError(f"Malformed header line {line[:80]!r}")
        headers.add(name, value.strip(" \t"))
    return headers


class Target(NamedTuple):
    origin: tuple[str, str, int]  # scheme, host, port: what a pooled connection serves
    host_header: str
    path: str


@lru_cache(maxsize=512)
def target_of(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host_header = parts.netloc.rpartition("@")[2]
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target((parts.scheme, parts.hostname, port), host_header, path)


class Proxy(NamedTuple):
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization value


def parse_proxy_url(url: str, variable: str) -> Proxy:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{variable}: only http:// proxies are supported (got {parts.scheme}://)")
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    return Proxy(parts.hostname, parts.port or 80, authorization)


def request_head(request: HTTPRequest, target: Target, body: bytes, via: Proxy | None) -> bytes:
    scheme = target.origin[0]
    if via is not None and scheme == "http":  # a plain proxy takes the absolute URL
        lines = [f"{request.method} http://{target.host_header}{target.path} HTTP/1.1"]
        if via.authorization:
            lines.append(f"Proxy-Authorization: {via.authorization}")
    else:
        lines = [f"{request.method} {target.path} HTTP/1.1"]
    lines.append(f"Host: {target.host_header}")
    if request.user_agent and "User-Agent" not in request.headers:
        lines.append(f"User-Agent: {request.user_agent}")
    for name, value in request.headers.get_all():
        if name in ("Host", "Content-Length", "Transfer-Encoding"):
            continue
        if "\r" in value or "\n" in value:
            raise ValueError(f"The request header {name} contains a line break.")
        lines.append(f"{name}: {value}")
    if body or request.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1")


def describe_error(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
