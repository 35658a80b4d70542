"""The web console in headless Chromium, served by the real gateway over the emulator.

A person's path through the page: load `/`, give a caller key, stream a
prompt and watch it arrive, then give an admin key (a wrong one first) and
find the deployments and the request just made. tests/test_console_page.py
covers what this gateway cannot produce (Responses streams, cooling-down
deployments, Azure's remaining counts) against a stub.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.async_api import expect

from emulator import AzureEmulator, Fault
from handlers.webconsole import CONSOLE_CSP

from .conftest import API_VERSION, EMULATOR_KEY, RunningGateway

# pytest finds fixtures by name in the test module.
from .support.browser import (  # noqa: F401
    ARTIFACTS,
    BROWSER_TEST,
    BrowserPage,
    browser_fixture,
    browser_page_fixture,
)
from .support.console_answer import WATCH_ANSWER, answer_steps
from .support.deployments import write_deployments_file

ALICE_KEY = "sk-alice-console-41c7"
OPS_KEY = "sk-ops-console-9d2a"
PROMPT = "Write two sentences about a quiet harbour at dawn"


@pytest.fixture
def console_gateway(
    tmp_path: Path, emulator: AzureEmulator, start_gateway: Callable[..., RunningGateway]
) -> RunningGateway:
    """Two deployments on the emulator; alice may call (60 a minute), ops is the admin."""
    entries = [
        {
            "name": name,
            "endpoint": emulator.url,
            "deployment": deployment,
            "api_version": API_VERSION,
            "key": EMULATOR_KEY,
            "models": ["gpt-4o"],
        }
        for name, deployment in (("primary", "gpt-4o"), ("secondary", "other-deployment"))
    ]
    keys = [
        {"name": "alice", "key": ALICE_KEY, "rpm": 60, "tpm": 100000},
        {"name": "ops", "key": OPS_KEY, "admin": True},
    ]
    return start_gateway(DEPLOYMENTS_FILE=write_deployments_file(tmp_path, entries, keys))


def only_admin_refusals(opened: BrowserPage, gateway: RunningGateway) -> list[str]:
    """Chromium logs each failed fetch; the admin key's refusals (401, 403) are expected."""
    return [
        problem.text
        for problem in opened.problems
        if not (
            problem.url.startswith(gateway.url + "/v1/admin/")
            and re.search(r"status of 40[13]", problem.text)
        )
    ]


@BROWSER_TEST
async def test_a_prompt_streams_in_and_the_admin_views_show_it(
    browser_page, console_gateway, emulator
):
    gateway = console_gateway
    page = browser_page.page
    await page.goto(gateway.url + "/")
    await expect(page).to_have_title("azure-gpt-api console")

    await page.get_by_label("Caller key").fill(ALICE_KEY)
    await page.get_by_label("Prompt").fill(PROMPT)
    # Leaving the key field lists the gateway's models; the first is chosen.
    await expect(page.get_by_label("Model")).to_have_value("primary")
    await page.evaluate(WATCH_ANSWER)
    # The emulator spaces its events, so the answer arrives in steps the page shows.
    emulator.add_fault(Fault(chunk_gap=0.05))
    await page.get_by_role("button", name="Send").click()

    await expect(page.locator("#fact-tokens")).to_have_text(re.compile(r"^\d+ / \d+$"))
    request_id = await page.locator("#fact-request-id").text_content()
    assert request_id and re.fullmatch(r"[0-9a-f]{32}", request_id)
    await expect(page.locator("#fact-attempts")).to_have_text("1")
    await expect(page.locator("#fact-deployment")).to_have_text("primary")
    await expect(page.locator("#fact-model")).to_have_text(emulator.model)
    await expect(page.locator("#fact-ttft")).to_have_text(re.compile(r"^\d+ ms$"))
    answer = await page.locator("#answer").text_content()
    steps = await answer_steps(page)
    assert answer and steps[-1] == answer
    assert len(set(steps)) > 2, f"the answer came in {len(set(steps))} step(s)"
    assert all(answer.startswith(step) for step in steps)  # it grew, never rewritten
    await expect(page.locator("#chat-error")).to_be_hidden()
    await browser_page.screenshot("gateway-console-playground")
    # The README's picture (docs/console.png) is a copy of this one: the visible part only.
    await page.screenshot(path=str(ARTIFACTS / "console-readme.png"))

    # Deployments: a wrong admin key is refused with the gateway's message.
    await page.get_by_role("link", name="Deployments").click()
    key_field = page.get_by_role("textbox", name="Admin key")
    await expect(page.locator("#admin-key-error")).to_contain_text("needs an admin key")
    await key_field.fill("sk-not-an-admin-key")
    await page.get_by_role("button", name="Use this key").click()
    await expect(page.locator("#admin-key-error")).to_have_text(
        "The admin key was refused (401): The admin key is not valid."
    )
    await expect(page.locator("#deployments")).to_be_hidden()
    await browser_page.screenshot("gateway-console-wrong-admin-key")

    # A caller key is a key, but not an admin's.
    await key_field.fill(ALICE_KEY)
    await page.get_by_role("button", name="Use this key").click()
    await expect(page.locator("#admin-key-error")).to_have_text(
        "The admin key was refused (403): The key 'alice' is not an admin key."
    )

    await key_field.fill(OPS_KEY)
    await page.get_by_role("button", name="Use this key").click()
    rows = page.locator("#deployments-table tbody tr")
    await expect(rows).to_have_count(2)
    host = "127.0.0.1"
    await expect(rows.nth(0)).to_contain_text("primary")
    await expect(rows.nth(0)).to_contain_text(f"gpt-4o @ {host}")
    await expect(rows.nth(0)).to_contain_text("ready")
    await expect(rows.nth(0)).to_contain_text("0 of 1 (0 %) in 300 s")
    await expect(rows.nth(1)).to_contain_text(f"other-deployment @ {host}")
    await expect(rows.nth(1)).to_contain_text("no requests in 300 s")
    await browser_page.screenshot("gateway-console-deployments")

    # Usage: alice's request on primary, her quota, and the request itself.
    await page.get_by_role("link", name="Usage").click()
    usage_rows = page.locator("#usage-table tbody tr")
    await expect(usage_rows).to_have_count(1)
    await expect(usage_rows.nth(0)).to_contain_text("alice")
    await expect(usage_rows.nth(0)).to_contain_text("primary")
    quotas = page.locator("#quota-table tbody")
    await expect(quotas).to_contain_text("59 of 60")
    requests = page.locator("#requests-table tbody tr")
    await expect(requests).to_have_count(1)
    await expect(requests.nth(0)).to_contain_text(request_id)
    await expect(requests.nth(0)).to_contain_text("200")
    await expect(page.locator("#usage")).to_contain_text("Counted by the gateway process")
    shown = await page.locator("#usage").text_content() or ""
    assert request_id in shown
    assert PROMPT not in shown and answer not in shown
    await browser_page.screenshot("gateway-console-usage")

    assert only_admin_refusals(browser_page, gateway) == []
    assert len(browser_page.problems) == 3  # no key, a wrong key, a caller's key


@pytest.mark.gen_test
async def test_the_console_is_served_at_the_root_with_its_policy(console_gateway):
    gateway = console_gateway
    page = await gateway.get("/")
    script = await gateway.get("/console/app.js")
    outside = await gateway.get("/console/../webconsole.py")
    assert page.code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert page.headers["Content-Security-Policy"] == CONSOLE_CSP
    assert "script-src 'self'" in CONSOLE_CSP and "'unsafe-inline'" not in CONSOLE_CSP
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Cache-Control"] == "no-cache"
    assert b'<script type="module" src="console/app.js">' in page.body
    assert b"<style" not in page.body and b" style=" not in page.body
    assert re.match(r"(text|application)/javascript", script.headers["Content-Type"])
    assert script.headers["Content-Security-Policy"] == CONSOLE_CSP
    assert outside.code in (403, 404)
    # The JSON routes are where they were.
    assert (await gateway.get("/v1")).code == 200
    assert (await gateway.get("/nowhere")).code == 404
