"""An `AsyncHTTPClient` that keeps HTTP/1.1 connections alive (pool.py says how and why).

pool.py holds the client (requests, their queue, the idle connections);
connection.py one connection and its parser; wire.py the plain functions
both use. Connections and the pool talk through `ConnectionOwner`.
"""

from gateway.upstream.httpclient.pool import KeepAliveHTTPClient
from gateway.upstream.httpclient.wire import HTTPTransportError, parse_header_lines, parse_proxy_url

__all__ = ["HTTPTransportError", "KeepAliveHTTPClient", "parse_header_lines", "parse_proxy_url"]
