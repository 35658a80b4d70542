"""KeepAliveHTTPClient against real sockets: a scripted HTTP/1.1 server and Tornado's own."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from gateway.upstream.httpclient import HTTPTransportError, KeepAliveHTTPClient

from .conftest import free_port
from .support.loopback import Answer, LoopbackServer, ScriptedServer, ok, reply


@pytest.fixture
def scripted(io_loop: Any) -> Any:
    server = ScriptedServer()
    io_loop.run_sync(server.start)
    yield server
    io_loop.run_sync(server.stop)


@pytest.fixture
def http(io_loop: Any) -> Any:
    client = KeepAliveHTTPClient(force_instance=True, max_clients=4)
    yield client
    client.close()
    io_loop.run_sync(lambda: asyncio.sleep(0))  # the dropped transports finish closing


@pytest.mark.gen_test
async def test_post_sends_one_well_formed_request_and_reads_the_answer(scripted, http):
    scripted.queue(ok(b'{"a":1}', "Content-Type: application/json", "apim-request-id: r1"))
    response = await http.fetch(
        scripted.url + "/openai/x?api-version=1", method="POST", body=b'{"q":2}',
        headers={"api-key": "k", "Content-Type": "application/json"}, user_agent="t",
    )  # fmt: skip
    assert (response.code, response.body) == (200, b'{"a":1}')
    assert response.headers["apim-request-id"] == "r1"
    head, body = scripted.requests[0].split(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /openai/x?api-version=1 HTTP/1.1"
    assert {"Api-Key: k", "Content-Length: 7", "User-Agent: t", f"Host: {scripted.url[7:]}"} <= set(
        lines
    )
    assert body == b'{"q":2}'


@pytest.mark.gen_test
async def test_sequential_requests_reuse_one_connection(scripted, http):
    for _ in range(20):
        assert (await http.fetch(scripted.url, method="POST", body=b"{}")).body == b"ok"
    assert scripted.connections == 1
    assert http.open_connections == 1


@pytest.mark.gen_test
async def test_error_statuses_are_responses_with_their_body(scripted, http):
    scripted.queue(
        reply(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 4\r\n\r\nslow")
    )
    response = await http.fetch(scripted.url, method="POST", body=b"{}", raise_error=False)
    assert (response.code, response.headers["Retry-After"], response.body) == (429, "3", b"slow")
    assert (await http.fetch(scripted.url, method="POST", body=b"{}")).code == 200
    assert scripted.connections == 1


@pytest.mark.gen_test
async def test_chunked_answer_streams_per_read_after_every_header_line(scripted, http):
    gate = asyncio.Event()

    async def chunked(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-One: 1\r\n\r\n5\r\nhello\r\n"
        )
        await writer.drain()
        await gate.wait()
        writer.write(b"1;ext=2\r\n \r\n6\r\nworld!\r\n0\r\nTrailer: t\r\n\r\n")
        await writer.drain()

    scripted.queue(chunked)
    seen: list[tuple[str, Any]] = []

    def on_chunk(data: bytes) -> None:
        seen.append(("body", data))
        gate.set()

    response = await http.fetch(
        scripted.url, method="POST", body=b"{}",
        header_callback=lambda line: seen.append(("header", line)), streaming_callback=on_chunk,
    )  # fmt: skip
    assert response.code == 200
    assert seen == [
        ("header", "HTTP/1.1 200 OK\r\n"),
        ("header", "Transfer-Encoding: chunked\r\n"),
        ("header", "X-One: 1\r\n"),
        ("header", "\r\n"),
        ("body", b"hello"),
        ("body", b" world!"),
    ]
    assert (await http.fetch(scripted.url, method="POST", body=b"{}")).body == b"ok"
    assert scripted.connections == 1


@pytest.mark.gen_test
async def test_chunk_framing_split_across_reads(scripted, http):
    async def dribble(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n3\r\nabc\r\n0\r\n\r\n"
        for index in range(len(raw)):
            writer.write(raw[index : index + 1])
            await writer.drain()
            await asyncio.sleep(0)

    scripted.queue(dribble)
    response = await http.fetch(scripted.url, method="POST", body=b"{}")
    assert response.body == b"0123456789abc"


@pytest.mark.gen_test
async def test_body_until_close_and_connection_close_are_not_reused(scripted, http):
    scripted.queue(reply(b"HTTP/1.1 200 OK\r\n\r\nuntil close"), close=True)
    assert (await http.fetch(scripted.url, method="POST", body=b"{}")).body == b"until close"
    scripted.queue(ok(b"once", "Connection: close"), close=True)
    assert (await http.fetch(scripted.url, method="POST", body=b"{}")).body == b"once"
    assert (await http.fetch(scripted.url, method="POST", body=b"{}")).body == b"ok"
    assert scripted.connections == 3


@pytest.mark.gen_test
async def test_interim_100_answer_is_skipped(scripted, http):
    scripted.queue(
        reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    )
    assert (await http.fetch(scripted.url, method="POST", body=b"{}")).body == b"hi"


@pytest.mark.gen_test
async def test_a_pooled_connection_closed_by_the_server_is_not_used(scripted, http):
    scripted.queue(ok(), close=True)  # keep-alive promised, then closed while idle
    await http.fetch(scripted.url, method="POST", body=b"{}")
    await scripted.closed.wait()
    assert (await http.fetch(scripted.url, method="POST", body=b"{}")).body == b"ok"
    assert scripted.connections == 2


@pytest.mark.gen_test
async def test_a_request_racing_the_servers_close_is_sent_again_once(scripted, http):
    await http.fetch(scripted.url, method="POST", body=b"{}")

    async def close_unanswered(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    scripted.queue(close_unanswered, close=True)
    assert (await http.fetch(scripted.url, method="POST", body=b"{}")).body == b"ok"
    assert (len(scripted.requests), scripted.connections) == (3, 2)
    # Twice in a row on one request is the server's answer, not a race.
    scripted.queue(close_unanswered, close=True)
    scripted.queue(close_unanswered, close=True)
    with pytest.raises(HTTPTransportError) as failure:
        await http.fetch(scripted.url, method="POST", body=b"{}")
    assert failure.value.kind == HTTPTransportError.CLOSED


@pytest.mark.gen_test
async def test_cut_mid_body_is_a_closed_transport_error(scripted, http):
    scripted.queue(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"), close=True)
    with pytest.raises(HTTPTransportError) as failure:
        await http.fetch(scripted.url, method="POST", body=b"{}")
    assert (failure.value.code, failure.value.kind) == (599, HTTPTransportError.CLOSED)


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "raw",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
)  # fmt: skip
async def test_garbled_answers_are_protocol_errors(scripted, http, raw):
    scripted.queue(reply(raw))
    with pytest.raises(HTTPTransportError) as failure:
        await http.fetch(scripted.url, method="POST", body=b"{}")
    assert failure.value.kind == HTTPTransportError.PROTOCOL


@pytest.mark.gen_test
async def test_body_over_the_limit_is_refused(io_loop, scripted):
    client = KeepAliveHTTPClient(force_instance=True, max_body_size=10)
    try:
        scripted.queue(ok(b"x" * 11))
        with pytest.raises(HTTPTransportError, match="size limit"):
            await client.fetch(scripted.url, method="POST", body=b"{}")
    finally:
        client.close()


@pytest.mark.gen_test
async def test_refused_connection_is_a_connect_error(http):
    with pytest.raises(HTTPTransportError) as failure:
        await http.fetch(f"http://127.0.0.1:{free_port()}/", method="POST", body=b"{}")
    assert failure.value.kind == HTTPTransportError.CONNECT


def hang() -> Answer:
    """Answer nothing; the request ends when the client closes the connection."""

    async def answer(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.read()

    return answer


@pytest.mark.gen_test
async def test_request_timeout_drops_the_connection(scripted, http):
    scripted.queue(hang())
    with pytest.raises(HTTPTransportError) as failure:
        await http.fetch(scripted.url, method="POST", body=b"{}", request_timeout=0.2)
    assert failure.value.kind == HTTPTransportError.TIMEOUT
    await scripted.closed.wait()


@pytest.mark.gen_test
async def test_abort_ends_the_request_and_its_connection_at_once(scripted, http):
    from tornado.httpclient import HTTPRequest

    scripted.queue(hang())
    request = HTTPRequest(scripted.url, method="POST", body=b"{}")
    fetch = http.fetch(request)
    await scripted.request_seen.wait()
    assert http.abort(request) is True
    with pytest.raises(HTTPTransportError) as failure:
        await fetch
    assert failure.value.kind == HTTPTransportError.ABORTED
    await scripted.closed.wait()
    assert http.abort(request) is False
    assert (await http.fetch(scripted.url, method="POST", body=b"{}")).body == b"ok"


@pytest.mark.gen_test
async def test_max_clients_bounds_connections_and_queues_the_rest(io_loop, scripted):
    client = KeepAliveHTTPClient(force_instance=True, max_clients=2)
    release = asyncio.Event()

    async def held(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await ok()(_reader, writer)

    try:
        for _ in range(5):
            scripted.queue(held)
        fetches = [
            asyncio.ensure_future(client.fetch(scripted.url, method="POST", body=b"{}"))
            for _ in range(5)
        ]
        while len(scripted.requests) < 2:
            await asyncio.sleep(0.01)
        assert len(scripted.requests) == 2
        release.set()
        assert [response.code for response in await asyncio.gather(*fetches)] == [200] * 5
        assert scripted.connections == 2
    finally:
        client.close()


@pytest.mark.gen_test
async def test_a_waiting_request_can_be_aborted_and_times_out(io_loop, scripted):
    from tornado.httpclient import HTTPRequest

    client = KeepAliveHTTPClient(force_instance=True, max_clients=1)
    try:
        scripted.queue(hang())
        busy = asyncio.ensure_future(client.fetch(scripted.url, method="POST", body=b"{}"))
        await scripted.request_seen.wait()
        waiting = HTTPRequest(scripted.url, method="POST", body=b"{}")
        fetch = client.fetch(waiting)
        client.abort(waiting)
        with pytest.raises(HTTPTransportError, match="aborted"):
            await fetch
        with pytest.raises(HTTPTransportError) as failure:
            await client.fetch(scripted.url, method="POST", body=b"{}", request_timeout=0.1)
        assert failure.value.kind == HTTPTransportError.TIMEOUT
        assert len(scripted.requests) == 1
    finally:
        client.close()
    with pytest.raises(HTTPTransportError, match="closed"):
        await busy


@pytest.mark.gen_test
async def test_a_header_with_a_line_break_is_never_sent(scripted, http):
    with pytest.raises(ValueError, match="line break"):
        await http.fetch(
            scripted.url, method="POST", body=b"{}", headers={"x-request-id": "a\r\nb: c"}
        )
    assert scripted.requests == []


class Echo(tornado.web.RequestHandler):
    def post(self) -> None:
        self.write(b"tls:" + self.request.body)


@pytest.fixture
def tls_echo(io_loop: Any, certificate: tuple[str, str]) -> Any:
    """An HTTPS server on 127.0.0.1 answering POST / with "tls:" + the body: (its URL, its certificate)."""
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sock, port = bind_unused_port()
    server = HTTPServer(tornado.web.Application([("/", Echo)]), ssl_options=context)
    server.add_sockets([sock])
    yield f"https://127.0.0.1:{port}/", cert
    server.stop()


@pytest.mark.gen_test
async def test_tls_with_a_trusted_certificate_and_keep_alive(http, tls_echo):
    url, cert = tls_echo
    with pytest.raises(HTTPTransportError) as failure:
        await http.fetch(url, method="POST", body=b"1")
    assert failure.value.kind == HTTPTransportError.CONNECT
    for body in (b"1", b"2"):
        response = await http.fetch(url, method="POST", body=body, ca_certs=cert)
        assert response.body == b"tls:" + body
    assert http.open_connections == 1


@pytest.fixture
def silent_listener() -> Any:
    """A socket that listens but never accepts: TCP connects, a TLS handshake never ends."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"https://127.0.0.1:{sock.getsockname()[1]}/"
    sock.close()


@pytest.mark.gen_test
async def test_connect_timeout_covers_the_tls_handshake(http, silent_listener):
    with pytest.raises(HTTPTransportError) as failure:
        await http.fetch(
            silent_listener, method="POST", body=b"{}", connect_timeout=0.2, validate_cert=False
        )
    assert (failure.value.kind, failure.value.message) == (
        HTTPTransportError.TIMEOUT,
        "Timeout while connecting.",
    )
    assert http.open_connections == 0


@pytest.mark.gen_test
async def test_abort_while_connecting(http, silent_listener):
    from tornado.httpclient import HTTPRequest

    request = HTTPRequest(silent_listener, method="POST", body=b"{}", validate_cert=False)
    fetch = http.fetch(request)  # the connection is being made from here on
    assert http.abort(request) is True
    with pytest.raises(HTTPTransportError) as failure:
        await fetch
    assert failure.value.kind == HTTPTransportError.ABORTED


class ForwardProxy(LoopbackServer):
    """An HTTP proxy: CONNECT tunnels, and absolute-URL requests passed on to their origin.

    `refuse` answers every CONNECT with it instead. Keeps each request head it read.
    """

    def __init__(self, refuse: bytes | None = None) -> None:
        super().__init__()
        self.refuse = refuse
        self.heads: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin1")
            self.heads.append(head)
            method, target, _ = head.split(" ", 2)
            if method == "CONNECT" and self.refuse:
                writer.write(self.refuse)
                return
            authority = target if method == "CONNECT" else target.split("/")[2]
            host, port = authority.rsplit(":", 1)
            upstream_reader, upstream = await asyncio.open_connection(host, int(port))
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # on to the origin with its own form of the request line
                upstream.write(head.replace(f"http://{authority}", "", 1).encode("latin1"))
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(upstream_reader, writer))
        finally:
            if upstream is not None:
                upstream.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.transport.abort()


async def proxied_client(proxy: ForwardProxy, **proxies: str) -> KeepAliveHTTPClient:
    """A client whose proxy settings may name the proxy as {proxy} (its URL) or {authority} (host:port)."""
    url = await proxy.start()
    settings = {
        name: value.format(proxy=url, authority=url[len("http://") :])
        for name, value in proxies.items()
    }
    return KeepAliveHTTPClient(force_instance=True, proxies=settings)


@pytest.mark.gen_test
async def test_https_through_a_connect_tunnel_with_proxy_credentials(tls_echo):
    url, cert = tls_echo
    proxy = ForwardProxy()
    client = await proxied_client(proxy, https="http://user:p%40ss@{authority}")
    try:
        for body in (b"1", b"2"):
            response = await client.fetch(url, method="POST", body=body, ca_certs=cert)
            assert response.body == b"tls:" + body
        assert proxy.connections == 1  # the tunnel is kept alive like any connection
        head = proxy.heads[0]
        assert head.startswith(f"CONNECT {url[len('https://') : -1]} HTTP/1.1\r\n")
        assert "Proxy-Authorization: Basic dXNlcjpwQHNz\r\n" in head  # user:p@ss
    finally:
        client.close()
        await proxy.stop()


@pytest.mark.gen_test
async def test_http_through_a_proxy_sends_the_absolute_url(scripted):
    proxy = ForwardProxy()
    client = await proxied_client(proxy, http="{proxy}")
    try:
        assert (
            await client.fetch(scripted.url + "/a?b=1", method="POST", body=b"{}")
        ).body == b"ok"
        assert proxy.heads[0].startswith(f"POST {scripted.url}/a?b=1 HTTP/1.1\r\n")
    finally:
        client.close()
        await proxy.stop()


@pytest.mark.gen_test
async def test_no_proxy_goes_direct(scripted):
    proxy = ForwardProxy()
    client = await proxied_client(proxy, http="{proxy}", no="localhost,127.0.0.1")
    try:
        assert (await client.fetch(scripted.url, method="POST", body=b"{}")).body == b"ok"
        assert proxy.connections == 0 and scripted.connections == 1
    finally:
        client.close()
        await proxy.stop()


@pytest.mark.gen_test
async def test_a_refused_tunnel_is_a_connect_error(io_loop):
    proxy = ForwardProxy(
        refuse=b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
    )
    client = await proxied_client(proxy, https="{proxy}")
    try:
        with pytest.raises(HTTPTransportError, match="407") as failure:
            await client.fetch(f"https://127.0.0.1:{free_port()}/", method="POST", body=b"{}")
        assert failure.value.kind == HTTPTransportError.CONNECT
    finally:
        client.close()
        await proxy.stop()


def test_only_plain_http_proxies_are_accepted(io_loop):
    with pytest.raises(ValueError, match="https_proxy: only http:// proxies"):
        KeepAliveHTTPClient(force_instance=True, proxies={"https": "https://proxy:3128"})


@pytest.mark.gen_test
async def test_the_gateway_reaches_azure_through_its_configured_proxy(start_gateway):
    proxy = ForwardProxy()
    url = await proxy.start()
    try:
        gateway = start_gateway(HTTP_PROXY=url)
        response = await gateway.post("/v1/gpt/chat", {"prompt": "hi"})
        assert response.code == 200
        assert len(proxy.heads) == 1
        assert proxy.heads[0].startswith(
            f"POST {gateway.emulator.url.rstrip('/')}/openai/deployments/"
        )
    finally:
        await proxy.stop()
