"""examples/web tried as a new user would, in real headless Chromium against a real broker:
the broker URL typed in the form survives a reload, the join form hides, a reload shows
every message once (one's own direct messages too), and the "To" field empties after a
direct message."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from .support import ROOT, BrokerProcess, Peer
from .test_console import _browser_available, run
from .test_js_client import static_site

# Chromium against broker serve processes, as in test_console.py.
pytestmark = [pytest.mark.process, pytest.mark.browser]

__all__ = ["_browser_available"]  # the autouse fixture: skip (or fail in CI) without a browser


async def open_page(browser: Browser, site: str) -> tuple[Page, list[str]]:
    page = await (await browser.new_context()).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    await page.goto(site + "/")  # no ?broker=: the URL is typed in the form
    return page, errors


async def join(page: Page, broker: BrokerProcess, user: tuple[str, str]) -> None:
    await page.get_by_test_id("broker").fill(broker.url)
    await page.get_by_test_id("token").fill(broker.token(*user))
    await page.get_by_test_id("join").click()
    await expect(page.get_by_test_id("status")).to_have_text(f"Connected as {user[1]}")


async def say(page: Page, text: str, to: str = "") -> None:
    await page.get_by_test_id("to").fill(to)
    await page.get_by_test_id("text").fill(text)
    await page.get_by_test_id("send").click()
    await expect(page.get_by_test_id("send-result")).to_contain_text("sent #")


def test_the_web_example_as_a_new_user_tries_it(make_broker: Any) -> None:
    # Not the default port: the page must use the URL typed in the form, after a reload too.
    broker: BrokerProcess = make_broker()

    async def scenario(browser: Browser) -> None:
        page, errors = await open_page(browser, site)
        await join(page, broker, ("1", "Alice"))
        await expect(page.get_by_test_id("join-form")).to_be_hidden()
        bob = await Peer.open(broker.url, broker.token("2", "Bob"))
        for i in range(30):
            await bob.request("pub", topic="chat/lobby", data=f"room {i}")
        await say(page, "just for Bob", to="2")
        await expect(page.get_by_test_id("to")).to_have_value("")  # the next one is public
        await say(page, "back to the room")
        for i in range(4):
            await bob.request("pub", topic="user/1", data=f"dm {i}")
        texts = page.get_by_test_id("message-text")
        await expect(texts).to_have_count(36)
        before = await texts.all_inner_texts()
        await page.reload()
        await expect(page.get_by_test_id("status")).to_have_text("Connected as Alice")
        await expect(page.get_by_test_id("join-form")).to_be_hidden()
        await bob.request("pub", topic="chat/lobby", data="after the reload")
        await expect(texts).to_have_count(37)
        assert await texts.all_inner_texts() == [*before, "after the reload"]
        assert "just for Bob" in before
        assert errors == []
        await bob.close()

    with static_site(ROOT / "examples" / "web") as site:
        run(scenario)


def test_a_broker_that_is_not_there_is_said_so(make_broker: Any) -> None:
    async def scenario(browser: Browser) -> None:
        page, errors = await open_page(browser, site)
        await page.get_by_test_id("broker").fill("ws://127.0.0.1:9/ws")
        await page.get_by_test_id("token").fill("a.b.c")
        await page.get_by_test_id("join").click()
        status = page.get_by_test_id("status")
        await expect(status).to_have_attribute("data-state", "failed")
        await expect(status).to_contain_text("Cannot load http://127.0.0.1:9/broker.js")
        assert not [e for e in errors if "Uncaught" in e or "TypeError" in e]

    with static_site(ROOT / "examples" / "web") as site:
        run(scenario)
