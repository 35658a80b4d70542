"""An `AsyncHTTPClient` that keeps HTTP/1.1 connections alive (see pool.py)."""

from gateway.upstream.httpclient.pool import (
    HTTPTransportError,
    KeepAliveHTTPClient,
    parse_header_lines,
    parse_proxy_url,
)

__all__ = ["HTTPTransportError", "KeepAliveHTTPClient", "parse_header_lines", "parse_proxy_url"]
