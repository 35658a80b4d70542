"""Watching the console's answer box grow, to tell a streamed answer from one written at once."""

from __future__ import annotations

from playwright.async_api import Page

# Records the answer's text after every change the page makes to it, in window.answerSteps.
WATCH_ANSWER = """() => {
    window.answerSteps = [];
    const answer = document.getElementById("answer");
    new MutationObserver(() => window.answerSteps.push(answer.textContent))
        .observe(answer, {childList: true, characterData: true, subtree: true});
}"""


async def answer_steps(page: Page) -> list[str]:
    """The answer's text after each change the page made to it, empty ones left out."""
    steps = await page.evaluate("window.answerSteps")
    return [step for step in steps if step]
