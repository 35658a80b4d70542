"""server.py as a user runs it: start-up errors, the emulator banner, HTTPS, SIGTERM drain."""

from __future__ import annotations

import http.client
import json
import signal
import urllib.error
import urllib.request

import pytest

from .conftest import STARTUP_TIMEOUT, free_port, server_env


def test_incomplete_settings_exit_2_naming_each_problem(tmp_path, spawn):
    secret = "do-not-print-this-key-4242"
    server = spawn(server_env(tmp_path, KEY=secret, temperature="abc", ENABLE_SSL="maybe"))
    output = server.finish()
    assert server.proc.returncode == 2
    assert "config error: ENDPOINT: is required (or set DEPLOYMENTS_FILE)" in output
    assert "config error: DEPLOYMENT_NAME: is required (or set DEPLOYMENTS_FILE)" in output
    assert "config error: temperature: must be a number from 0 to 2" in output
    assert "config error: ENABLE_SSL: must be true or false" in output
    assert secret not in output


def test_emulator_mode_says_so_and_answers_even_with_a_proxy_set(tmp_path, spawn):
    port = free_port()
    # Nothing listens at the proxy's address: the emulator must be reached directly.
    proxy = f"http://127.0.0.1:{free_port()}"
    server = spawn(server_env(tmp_path, HTTP_PORT=str(port), HTTP_PROXY=proxy), "--emulator")
    server.wait_for(r"listening on http://")
    assert "EMULATOR MODE: answers are synthetic" in server.output
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/gpt/chat",
        data=json.dumps({"prompt": "ping"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    assert body["success"] == 1
    assert body["choices"][0]["message"]["content"] == "You said: ping"


def test_sigterm_lets_an_inflight_stream_finish_then_exits_0(tmp_path, spawn):
    port = free_port()
    server = spawn(server_env(tmp_path, HTTP_PORT=str(port), DRAIN_TIMEOUT="20"), "--emulator")
    match = server.wait_for(r"emulator at (http://127\.0\.0\.1:\d+)")
    server.wait_for(r"listening on http://")
    fault = urllib.request.Request(
        match.group(1) + "/_emulator/faults",
        data=json.dumps({"chunk_gap": 0.1}).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(fault, timeout=10).close()

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    connection.request(
        "POST",
        "/v1/gpt/chat",
        body=json.dumps({"prompt": "one two three four five six", "stream": True}),
        headers={"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200
    first = response.readline()
    assert first.startswith(b"data: ")
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for(r"draining 1 in-flight")

    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).connect()
    rest = response.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert server.proc.wait(STARTUP_TIMEOUT) == 0
    connection.close()


@pytest.mark.gen_test
async def test_https_serves_with_the_given_certificate_and_hsts(start_gateway, certificate):
    cert, key = certificate
    gateway = start_gateway(ENABLE_SSL="true", HTTPS_PORT="0", SSL_CERT=cert, SSL_KEY=key)
    url = f"https://127.0.0.1:{gateway.server.ports['https']}"
    status = await gateway.client.fetch(url + "/v1", ca_certs=cert)
    assert json.loads(status.body)["message"] == "GPT API: OK"
    assert status.headers["Strict-Transport-Security"].startswith("max-age=")
    chat = await gateway.client.fetch(
        url + "/v1/gpt/chat",
        method="POST",
        body=json.dumps({"prompt": "secure"}),
        headers={"Content-Type": "application/json"},
        ca_certs=cert,
    )
    assert json.loads(chat.body)["choices"][0]["message"]["content"] == "You said: secure"


def test_drain_grace_makes_readyz_503_while_still_serving(tmp_path, spawn):
    port = free_port()
    server = spawn(server_env(tmp_path, HTTP_PORT=str(port), DRAIN_GRACE="3"), "--emulator")
    server.wait_for(r"listening on http://")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as ready:
        assert json.loads(ready.read()) == {"status": "ready"}
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for(r"draining: /readyz is 503")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
    assert caught.value.code == 503
    caught.value.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as health:
        assert health.status == 200
    assert server.proc.wait(STARTUP_TIMEOUT) == 0
