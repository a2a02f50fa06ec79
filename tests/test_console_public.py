"""The browser console on public topics, and what it says after a reload, in real headless
Chromium against real brokers (the helpers are tests/test_console.py's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, expect

from .support import BrokerProcess, Peer, public_broker
from .test_console import _browser_available, message, open_console, run

# Chromium against broker serve processes, as in test_console.py.
pytestmark = [pytest.mark.process, pytest.mark.browser]

__all__ = ["_browser_available"]  # the autouse fixture: skip (or fail in CI) without a browser


def test_a_visitor_without_a_token_watches_public_topics_at_once(
    make_broker: Any, tmp_path: Path
) -> None:
    broker = public_broker(make_broker, tmp_path)

    async def scenario(browser: Browser) -> None:
        pub = await Peer.open(broker.url, broker.token("p"))
        for topic, score in [("scores/a", "0-0"), ("scores/b", "1-0"), ("scores/a", "1-0")]:
            await pub.request("pub", topic=topic, data=score)
        page = await open_console(browser, broker.http_url)
        await expect(page.status).to_have_attribute("data-state", "connected")
        await expect(page.status).to_have_attribute("data-anonymous", "true")
        await expect(page.by("status-text")).to_have_text("Watching public topics")
        await expect(page.sub_row("scores/#")).to_have_attribute("data-state", "active")
        # The current score of each match: one message per topic.
        await expect(page.messages()).to_have_count(2)
        assert await page.message_texts() == ["1-0", "1-0"]
        await pub.request("pub", topic="scores/b", data="2-0")
        await expect(message(page, "2-0")).to_have_count(1)
        await pub.request("pub", topic="chat", data="not public")
        await expect(page.messages()).to_have_count(3)
        await expect(page.by("pub-button")).to_be_disabled()
        # A reload resumes: nothing lost, nothing twice.
        await page.page.reload()
        await expect(page.status).to_have_attribute("data-state", "connected")
        await pub.request("pub", topic="scores/a", data="2-1")
        await expect(message(page, "2-1")).to_have_count(1)
        await expect(page.messages()).to_have_count(4)
        page.assert_clean()

    run(scenario)


def test_without_public_topics_the_console_waits_for_a_token(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        page = await open_console(browser, broker.http_url)
        await expect(page.by("status-text")).to_have_text("Not connected")
        await page.by("connect").click()
        await expect(page.by("conn-detail")).to_have_text("Paste a token first.")

    run(scenario)


def test_after_a_reload_the_console_says_it_shows_only_the_latest_it_kept(
    broker: BrokerProcess,
) -> None:
    async def scenario(browser: Browser) -> None:
        page = await open_console(browser, broker.http_url)
        await page.connect(broker.token("1", "Alice"))
        await page.subscribe("feed")
        pub = await Peer.open(broker.url, broker.token("p"))
        for i in range(205):
            await pub.send({"op": "pub", "topic": "feed", "data": f"m{i}", "id": i})
        for _ in range(205):
            await pub.recv()
        await expect(message(page, "m204")).to_have_count(1)
        await page.page.reload()
        notice = page.by("notice").first
        await expect(notice).to_contain_text("Showing the latest 200 messages")
        await expect(notice).to_contain_text("5 older ones are not kept")
        await expect(page.messages()).to_have_count(200)

    run(scenario)
