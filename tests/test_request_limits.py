"""Limits on what a caller's connection may hold, over raw sockets: 408, 413 at once, 431, idle close."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest

from emulator import Fault

READ_TIMEOUT = 10.0


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class RawConnection:
    """A caller that writes exactly the bytes it is given, as a slow or hostile client would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> RawAnswer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), READ_TIMEOUT)
        return RawAnswer(int(status_line.split()[1]), headers, body)

    async def closed_by_server(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), READ_TIMEOUT) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.writer.close()


def request_head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


def port_of(gateway) -> int:
    return gateway.server.ports["http"]


@pytest.mark.gen_test(timeout=20)
async def test_a_slow_body_is_cut_at_the_body_timeout_while_others_are_served(start_gateway):
    gateway = start_gateway(BODY_TIMEOUT="0.5")
    slow = await RawConnection.open(port_of(gateway))
    await slow.send(
        request_head(
            "POST", "/v1/gpt/chat", "Content-Type: application/json", "Content-Length: 100"
        )
        + b'{"prompt": "'
    )
    served = await gateway.post("/v1/gpt/chat", {"prompt": "meanwhile"})
    assert served.code == 200
    answer = await slow.answer()
    assert answer.status == 408
    assert answer.headers["connection"] == "close"
    assert answer.json() == {
        "success": 0,
        "message": "The request body did not arrive within 0.5 s.",
        "error": {
            "code": "body_timeout",
            "message": "The request body did not arrive within 0.5 s.",
            "type": "invalid_request_error",
            "param": None,
        },
    }
    assert await slow.closed_by_server()
    slow.close()
    assert len(gateway.emulator.requests) == 1  # only the one served


@pytest.mark.gen_test(timeout=20)
async def test_the_body_timeout_answers_in_each_routes_shape(start_gateway):
    gateway = start_gateway(BODY_TIMEOUT="0.3")
    openai = await RawConnection.open(port_of(gateway))
    await openai.send(request_head("POST", "/v1/chat/completions", "Content-Length: 10"))
    models = await RawConnection.open(port_of(gateway))
    await models.send(request_head("GET", "/v1/models", "Content-Length: 10") + b"abc")
    answer = await openai.answer()
    assert answer.status == 408 and answer.json()["error"]["code"] == "body_timeout"
    assert "success" not in answer.json()
    answer = await models.answer()
    assert answer.status == 408 and answer.json()["error"]["code"] == "body_timeout"
    for connection in (openai, models):
        assert await connection.closed_by_server()
        connection.close()


@pytest.mark.gen_test(timeout=20)
async def test_a_body_that_arrives_in_time_is_not_cut_by_a_slow_upstream(start_gateway):
    gateway = start_gateway(BODY_TIMEOUT="0.2")
    gateway.emulator.add_fault(Fault(delay=0.5))
    response = await gateway.post("/v1/gpt/chat", {"prompt": "slow answer"})
    assert response.code == 200


@pytest.mark.gen_test(timeout=20)
async def test_a_header_block_over_the_limit_gets_a_short_431(gateway):
    connection = await RawConnection.open(port_of(gateway))
    await connection.send(request_head("GET", "/v1", "X-Padding: " + "a" * 100 * 1024))
    answer = await connection.answer()
    assert answer.status == 431
    assert len(answer.body) < 300
    assert answer.json()["error"]["code"] == "headers_too_large"
    assert "exceeds the limit of 65536 bytes" in answer.json()["message"]
    assert await connection.closed_by_server()
    connection.close()

    connection = await RawConnection.open(port_of(gateway))
    await connection.send(
        request_head("POST", "/v1/chat/completions", "Cookie: " + "c" * 70_000, "Content-Length: 2")
        + b"{}"
    )
    answer = await connection.answer()
    assert answer.status == 431 and answer.json()["error"]["code"] == "headers_too_large"
    assert "success" not in answer.json()
    connection.close()
    assert gateway.emulator.requests == []


@pytest.mark.gen_test(timeout=20)
async def test_headers_within_the_limit_are_served(start_gateway):
    gateway = start_gateway(MAX_HEADER_SIZE="2048")
    response = await gateway.get("/v1", headers={"X-Padding": "a" * 1500})
    assert response.code == 200
    response = await gateway.get("/v1", headers={"X-Padding": "a" * 2100})
    assert response.code == 431


@pytest.mark.gen_test(timeout=20)
async def test_a_header_block_too_large_to_read_is_closed(gateway):
    # Past 4 x MAX_HEADER_SIZE Tornado stops reading: no answer can be sent.
    connection = await RawConnection.open(port_of(gateway))
    connection.writer.write(request_head("GET", "/v1", "X-Padding: " + "a" * 300 * 1024))
    assert await connection.closed_by_server()
    connection.close()


@pytest.mark.gen_test(timeout=20)
async def test_a_route_without_a_json_body_refuses_a_large_one_at_once(gateway):
    # Only the headers are sent: the 413 must come without waiting for the body.
    connection = await RawConnection.open(port_of(gateway))
    await connection.send(request_head("GET", "/v1/models", "Content-Length: 100000000"))
    answer = await connection.answer()
    assert answer.status == 413
    assert answer.json()["error"]["code"] == "body_too_large"
    assert "no request body over 4096 bytes" in answer.json()["error"]["message"]
    assert answer.headers["connection"] == "close"
    assert await connection.closed_by_server()
    connection.close()

    # A chunked body has no length up front: refused as soon as it passes the limit.
    connection = await RawConnection.open(port_of(gateway))
    await connection.send(request_head("POST", "/nowhere", "Transfer-Encoding: chunked"))
    await connection.send(b"1000\r\n" + b"x" * 0x1000 + b"\r\n" + b"10\r\n" + b"y" * 16 + b"\r\n")
    answer = await connection.answer()
    assert answer.status == 413
    connection.close()


@pytest.mark.gen_test(timeout=20)
async def test_a_small_body_on_such_a_route_keeps_the_connection(gateway):
    connection = await RawConnection.open(port_of(gateway))
    await connection.send(request_head("GET", "/healthz", "Content-Length: 5") + b"hello")
    assert (await connection.answer()).status == 200
    await connection.send(request_head("GET", "/nope", "Content-Length: 2") + b"{}")
    assert (await connection.answer()).status == 404
    await connection.send(request_head("GET", "/readyz"))
    assert (await connection.answer()).status == 200
    connection.close()


@pytest.mark.gen_test(timeout=20)
async def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(start_gateway):
    gateway = start_gateway(KEEP_ALIVE_TIMEOUT="0.3")
    connection = await RawConnection.open(port_of(gateway))
    await connection.send(request_head("GET", "/healthz"))
    assert (await connection.answer()).status == 200
    assert await connection.closed_by_server()
    connection.close()
