"""The web console in a real browser, against canned admin documents and a canned stream.

What the real gateway over the emulator cannot show (tests/test_console_gateway.py
walks the page against it): a stream held after its first words, with CRLF
line ends and comments, Responses streams, deployments cooling down with
Azure's remaining counts, the phone layout, the stream parser and the
Content-Security-Policy at work. A small Tornado app in the test serves
`handlers/console/` as the gateway does (the same handler, the same policy)
and the admin documents `gateway.ops.admin` builds.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.async_api import expect
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from gateway.ops.admin import (
    DeploymentState,
    KeyQuota,
    RecentRequests,
    deployments_document,
    requests_document,
    usage_document,
)
from handlers.webconsole import console_routes

# pytest finds fixtures by name in the test module.
from .support.browser import (  # noqa: F401
    BROWSER_TEST,
    PHONE,
    BrowserPage,
    BrowserSession,
    browser_fixture,
    browser_page_fixture,
)
from .support.console_answer import WATCH_ANSWER, answer_steps

ADMIN_KEY = "admin-console-key-5d1e"
CALLER_KEY = "caller-console-key-8b2f"
PROMPT_IN_RECORD = "a prompt that must never reach the page"
ADMIN_REFUSAL = "The admin routes need an admin key in the Authorization header."


def canned_recent_requests() -> RecentRequests:
    recent = RecentRequests(capacity=10)
    recent.add(
        {
            "time": "2026-01-01T11:59:58.120Z",
            "request_id": "req-earlier-1",
            "method": "POST",
            "route": "chat_completions",
            "path": "/v1/chat/completions",
            "status": 200,
            "key": "alice",
            "deployment": "westeurope",
            "upstream_status": 200,
            "attempts": 2,
            "duration_ms": 812.4,
            "ttft_ms": 230.1,
            "prompt_tokens": 30,
            "completion_tokens": 12,
            "prompt": PROMPT_IN_RECORD,
        }
    )
    recent.add(
        {
            "time": "2026-01-01T11:59:59.500Z",
            "request_id": "req-earlier-2",
            "route": "chat_completions",
            "status": 429,
            "key": "bob",
            "duration_ms": 3.2,
        }
    )
    return recent


CANNED_DEPLOYMENTS = deployments_document(
    [
        DeploymentState(
            name="westeurope",
            deployment="gpt-4o",
            endpoint="https://we.openai.azure.com",
            models=("gpt-4o",),
            in_flight=1,
            azure_remaining_requests=99,
            azure_remaining_tokens=9000,
            recent_requests=20,
            recent_errors=2,
        ),
        DeploymentState(
            name="eastus",
            deployment="gpt-4o-east",
            endpoint="https://east.openai.azure.com",
            weight=2.0,
            cooling_for=12.5,
        ),
    ]
)
CANNED_USAGE = usage_document(
    {
        "keys": {
            "alice": {"westeurope": {"requests": 3, "prompt_tokens": 30, "completion_tokens": 12}},
            "bob": {"eastus": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 5}},
        }
    },
    scope="process",
    quotas=[
        KeyQuota("alice", rpm=60, tpm=10000, requests_used=3, tokens_used=42, resets_in_seconds=41)
    ],
)
CANNED_REQUESTS = requests_document(canned_recent_requests(), limit=50)


@dataclass
class ConsoleStub:
    """What the stub gateway was asked, and the gates its streams wait at."""

    port: int = 0
    chat_bodies: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    rest_of_stream: asyncio.Event = field(default_factory=asyncio.Event)
    caller_went_away: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def openai_error(handler: RequestHandler, status: int, code: str, message: str) -> None:
    handler.set_status(status)
    handler.finish({"error": {"code": code, "message": message, "type": "invalid_request_error"}})


class AdminStubHandler(RequestHandler):
    def initialize(self, document: dict[str, Any]) -> None:
        self.document = document

    def get(self) -> None:
        if self.request.headers.get("Authorization") != f"Bearer {ADMIN_KEY}":
            openai_error(self, 401, "invalid_admin_key", ADMIN_REFUSAL)
            return
        self.set_header("Cache-Control", "no-store")
        self.finish(self.document)


class ModelsStubHandler(RequestHandler):
    def get(self) -> None:
        self.finish({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})


class StreamStubHandler(RequestHandler):
    """A streamed answer in two parts: the second waits until the test has seen the first."""

    def initialize(self, stub: ConsoleStub, first: list[bytes], rest: list[bytes]) -> None:
        self.stub = stub
        self.first = first
        self.rest = rest

    def on_connection_close(self) -> None:
        self.stub.caller_went_away.set()

    async def post(self) -> None:
        self.stub.authorizations.append(self.request.headers.get("Authorization"))
        if self.request.headers.get("Authorization") != f"Bearer {CALLER_KEY}":
            openai_error(self, 401, "invalid_api_key", "Incorrect API key provided.")
            return
        self.stub.chat_bodies.append(json.loads(self.request.body))
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("x-request-id", "req-console-1")
        self.set_header("x-upstream-attempts", "2")
        self.set_header("x-upstream-deployment", "westeurope")
        for frame in self.first:
            self.write(frame)
        await self.flush()
        gate = asyncio.ensure_future(self.stub.rest_of_stream.wait())
        gone = asyncio.ensure_future(self.stub.caller_went_away.wait())
        await asyncio.wait((gate, gone), return_when=asyncio.FIRST_COMPLETED)
        gate.cancel()
        gone.cancel()
        if self.stub.caller_went_away.is_set():
            return
        for frame in self.rest:
            self.write(frame)
            await self.flush()
        self.finish()


def chat_frame(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-console",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


CHAT_FIRST = [
    chat_frame(chat_chunk({"role": "assistant", "content": ""})),
    chat_frame(chat_chunk({"content": "Hello"})),
]
CHAT_REST = [
    # CRLF line ends and a comment, as some servers send them.
    b'data: {"id":"chatcmpl-console","model":"gpt-4o-2024-08-06","choices":'
    b'[{"index":0,"delta":{"content":", world"},"finish_reason":null}]}\r\n\r\n',
    b": keep-alive\n\n",
    chat_frame(chat_chunk({"content": "!"}, "stop")),
    chat_frame(
        {
            "id": "chatcmpl-console",
            "model": "gpt-4o-2024-08-06",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        }
    ),
    chat_frame("[DONE]"),
]


def responses_frame(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


RESPONSES_FIRST = [
    responses_frame(
        {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}
    ),
    responses_frame({"type": "response.output_text.delta", "delta": "Bonjour"}),
]
RESPONSES_REST = [
    responses_frame({"type": "response.output_text.delta", "delta": " le monde"}),
    responses_frame(
        {
            "type": "response.completed",
            "response": {
                "id": "resp_1",
                "status": "completed",
                "model": "gpt-4o-2024-08-06",
                "usage": {"input_tokens": 8, "output_tokens": 4, "total_tokens": 12},
            },
        }
    ),
]


@pytest.fixture
def console(io_loop: Any) -> Iterator[ConsoleStub]:
    stub = ConsoleStub()
    app = Application(
        [
            *console_routes(),
            (r"/v1/admin/deployments", AdminStubHandler, {"document": CANNED_DEPLOYMENTS}),
            (r"/v1/admin/usage", AdminStubHandler, {"document": CANNED_USAGE}),
            (r"/v1/admin/requests", AdminStubHandler, {"document": CANNED_REQUESTS}),
            (r"/v1/models", ModelsStubHandler),
            (
                r"/v1/chat/completions",
                StreamStubHandler,
                {"stub": stub, "first": CHAT_FIRST, "rest": CHAT_REST},
            ),
            (
                r"/v1/responses",
                StreamStubHandler,
                {"stub": stub, "first": RESPONSES_FIRST, "rest": RESPONSES_REST},
            ),
        ]
    )
    sockets = bind_sockets(0, "127.0.0.1")
    stub.port = sockets[0].getsockname()[1]
    server = HTTPServer(app)
    server.add_sockets(sockets)
    yield stub
    server.stop()
    io_loop.run_sync(server.close_all_connections)


def assert_no_console_problems(opened: BrowserPage) -> None:
    assert opened.problems == []


@BROWSER_TEST
async def test_the_playground_streams_a_chat_answer_as_it_arrives(browser_page, console):
    page = browser_page.page
    await page.goto(console.url + "/")
    await expect(page).to_have_title("azure-gpt-api console")
    await page.get_by_label("Caller key").fill(CALLER_KEY)
    await page.get_by_label("Prompt").fill("Say hello")
    # Leaving the key field lists the models, and the first one is chosen.
    await expect(page.get_by_label("Model")).to_have_value("gpt-4o")
    await page.evaluate(WATCH_ANSWER)
    await page.get_by_role("button", name="Send").click()

    answer = page.locator("#answer")
    await expect(answer).to_have_text("Hello")
    await expect(page.locator("#fact-request-id")).to_have_text("req-console-1")
    await expect(page.locator("#fact-attempts")).to_have_text("2")
    await expect(page.locator("#fact-deployment")).to_have_text("westeurope")
    await expect(page.locator("#fact-ttft")).to_have_text(re.compile(r"^\d+ ms$"))
    console.rest_of_stream.set()
    await expect(answer).to_have_text("Hello, world!")
    await expect(page.locator("#fact-tokens")).to_have_text("9 / 3")
    await expect(page.locator("#fact-model")).to_have_text("gpt-4o-2024-08-06")
    steps = await answer_steps(page)
    assert (steps[0], steps[-1]) == ("Hello", "Hello, world!")

    raw = page.locator("#raw-events")
    await expect(raw).to_be_hidden()
    await page.get_by_text("Raw events").click()
    await expect(raw).to_be_visible()
    await expect(raw).to_contain_text('"content": "Hello"')
    await expect(raw).to_contain_text("data: [DONE]")

    assert console.authorizations == [f"Bearer {CALLER_KEY}"]
    (body,) = console.chat_bodies
    assert body == {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    await browser_page.screenshot("console-playground")
    assert_no_console_problems(browser_page)


@BROWSER_TEST
async def test_the_playground_streams_a_responses_answer(browser_page, console):
    page = browser_page.page
    await page.goto(console.url + "/")
    await page.get_by_label("API").select_option("responses")
    await page.get_by_label("Model").fill("gpt-4o")
    await page.get_by_label("Caller key").fill(CALLER_KEY)
    await page.get_by_label("Prompt").fill("Dis bonjour")
    await page.evaluate(WATCH_ANSWER)
    await page.get_by_role("button", name="Send").click()
    answer = page.locator("#answer")
    await expect(answer).to_have_text("Bonjour")
    console.rest_of_stream.set()
    await expect(answer).to_have_text("Bonjour le monde")
    await expect(page.locator("#fact-tokens")).to_have_text("8 / 4")
    await expect(page.locator("#fact-model")).to_have_text("gpt-4o-2024-08-06")
    steps = await answer_steps(page)
    assert (steps[0], steps[-1]) == ("Bonjour", "Bonjour le monde")
    (body,) = console.chat_bodies
    assert body == {"model": "gpt-4o", "input": "Dis bonjour", "stream": True}
    assert_no_console_problems(browser_page)


@BROWSER_TEST
async def test_stop_ends_the_stream_and_the_gateway_sees_the_caller_leave(browser_page, console):
    page = browser_page.page
    await page.goto(console.url + "/")
    await page.get_by_label("Model").fill("gpt-4o")
    await page.get_by_label("Caller key").fill(CALLER_KEY)
    await page.get_by_label("Prompt").fill("Say hello")
    await page.get_by_role("button", name="Send").click()
    await expect(page.locator("#answer")).to_have_text("Hello")
    await page.get_by_role("button", name="Stop").click()
    await expect(page.locator("#chat-error")).to_have_text("Stopped.")
    await expect(page.get_by_role("button", name="Send")).to_be_enabled()
    await expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    await asyncio.wait_for(console.caller_went_away.wait(), 10)
    assert_no_console_problems(browser_page)


@BROWSER_TEST
async def test_a_refused_caller_key_shows_the_gateways_message(browser_page, console):
    page = browser_page.page
    await page.goto(console.url + "/")
    await page.get_by_label("Model").fill("gpt-4o")
    await page.get_by_label("Caller key").fill("not-the-key")
    await page.get_by_label("Prompt").fill("Say hello")
    await page.get_by_role("button", name="Send").click()
    await expect(page.locator("#chat-error")).to_have_text("401: Incorrect API key provided.")
    await expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert {problem.url for problem in browser_page.problems} <= {
        console.url + "/v1/models",
        console.url + "/v1/chat/completions",
    }
    assert all("status of 401" in problem.text for problem in browser_page.problems)


@BROWSER_TEST
async def test_admin_views_show_the_documents_and_ask_for_the_key_once(browser_page, console):
    page = browser_page.page
    await page.goto(console.url + "/#deployments")
    key_panel = page.locator("#admin-key")
    await expect(key_panel).to_be_visible()
    await expect(page.locator("#admin-key-error")).to_have_text(
        f"This view needs an admin key: {ADMIN_REFUSAL}"
    )
    await page.get_by_role("textbox", name="Admin key").fill(ADMIN_KEY)
    await page.get_by_role("button", name="Use this key").click()

    await expect(key_panel).to_be_hidden()
    rows = page.locator("#deployments-table tbody tr")
    await expect(rows).to_have_count(2)
    await expect(rows.nth(0)).to_contain_text("westeurope")
    await expect(rows.nth(0)).to_contain_text("gpt-4o @ we.openai.azure.com")
    await expect(rows.nth(0)).to_contain_text("ready")
    await expect(rows.nth(0)).to_contain_text("99 / 9,000")
    await expect(rows.nth(0)).to_contain_text("2 of 20 (10 %) in 300 s")
    await expect(rows.nth(1)).to_contain_text("eastus")
    await expect(rows.nth(1)).to_contain_text(re.compile(r"cooling down until \S+ \(12\.5 s\)"))
    await browser_page.screenshot("console-deployments")

    await page.get_by_role("link", name="Usage").click()
    usage_rows = page.locator("#usage-table tbody tr")
    await expect(usage_rows).to_have_count(2)
    await expect(usage_rows.nth(0)).to_contain_text("alice")
    await expect(usage_rows.nth(0)).to_contain_text("42")
    await expect(page.locator("#usage-table tfoot")).to_contain_text("52")
    await expect(page.locator("#quota-table tbody")).to_contain_text("57 of 60")
    await expect(page.locator("#quota-table tbody")).to_contain_text("9,958 of 10,000")
    requests = page.locator("#requests-table tbody tr")
    await expect(requests).to_have_count(2)
    await expect(requests.nth(0)).to_contain_text("req-earlier-2")
    await expect(requests.nth(1)).to_contain_text("req-earlier-1")
    await expect(requests.nth(1)).to_contain_text("30 / 12")
    await expect(page.locator("#usage")).to_contain_text("Counted by the gateway process")
    assert PROMPT_IN_RECORD not in await page.content()
    await browser_page.screenshot("console-usage")

    stored = await page.evaluate("[sessionStorage.length, localStorage.length]")
    assert stored == [1, 0]
    await page.reload()
    await expect(usage_rows).to_have_count(2)
    await expect(key_panel).to_be_hidden()
    assert_no_console_problems_but_the_first_refusal(browser_page, console)


def assert_no_console_problems_but_the_first_refusal(opened: BrowserPage, console: ConsoleStub):
    """Chromium logs every failed fetch; the one 401 before the key was given is expected."""
    assert [(problem.url, "status of 401" in problem.text) for problem in opened.problems] == [
        (console.url + "/v1/admin/deployments", True)
    ]


@BROWSER_TEST
async def test_every_view_fits_a_phone_screen(browser: BrowserSession, console):
    phone = await browser.open_page(PHONE)
    page = phone.page
    await page.goto(console.url + "/#usage")
    await page.get_by_role("textbox", name="Admin key").fill(ADMIN_KEY)
    await page.get_by_role("button", name="Use this key").click()
    await expect(page.locator("#requests-table tbody tr")).to_have_count(2)
    for view in ("usage", "deployments", "playground"):
        await page.get_by_role("link", name=view.capitalize()).click()
        await expect(page.locator(f"#{view}")).to_be_visible()
        widths = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], f"the {view} view is wider than the screen: {widths}"
    await page.get_by_role("link", name="Usage").click()
    await phone.screenshot("console-phone-usage")


@BROWSER_TEST
async def test_the_stream_parser_follows_the_standard(browser_page, console):
    page = browser_page.page
    await page.goto(console.url + "/")
    events = await page.evaluate(
        """async () => {
            const { SSEParser } = await import("/console/sse.js");
            const parser = new SSEParser();
            const pieces = [
                "data: a\\r", "\\ndata: b\\n\\nev", "ent: x\\nid: 7\\ndata:{\\"k\\":1}\\n",
                "\\n: comment\\n\\r\\ndata", ": last",
            ];
            const events = pieces.flatMap((piece) => parser.push(piece));
            return [...events, ...parser.end()];
        }"""
    )
    assert events == [
        {"type": "message", "data": "a\nb", "id": ""},
        {"type": "x", "data": '{"k":1}', "id": "7"},
    ]
    assert_no_console_problems(browser_page)


@BROWSER_TEST
async def test_the_policy_blocks_injected_styles_and_the_test_sees_it(browser_page, console):
    """The no-console-errors checks above have teeth: a CSP violation is reported."""
    page = browser_page.page
    await page.goto(console.url + "/")
    assert browser_page.problems == []
    async with page.expect_console_message(lambda message: message.type == "error"):
        await page.evaluate(
            """() => {
                document.getElementById("answer").innerHTML = '<b style="color:red">x</b>';
            }"""
        )
    color = await page.evaluate("getComputedStyle(document.querySelector('#answer b')).color")
    assert color != "rgb(255, 0, 0)"
    assert any("Content Security Policy" in problem.text for problem in browser_page.problems)
