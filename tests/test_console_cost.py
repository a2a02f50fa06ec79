"""What the browser console at ``GET /`` spends per message, in real headless Chromium.

An init script wraps the page's ``JSON.stringify`` and counts what it produces while large
messages arrive: a message must cost about its own size, not the size of every message
kept (the console once rewrote its whole kept list to sessionStorage for each message:
12 MiB of JSON per 64 KiB message). Skips without chromium or Playwright, fails under CI.
"""

from __future__ import annotations

import os

import pytest

from .support import BrokerProcess, Peer
from .test_console import CHROMIUM, async_playwright, message, open_console, run

# A browser against a broker serve process, as in test_console.py.
pytestmark = [pytest.mark.process, pytest.mark.browser]

if async_playwright is not None:
    from playwright.async_api import Browser, expect

COUNT_STRINGIFY = """
(() => {
  const stringify = JSON.stringify;
  window.__stringified = { calls: 0, chars: 0 };
  JSON.stringify = function (...args) {
    const out = stringify.apply(this, args);
    window.__stringified.calls += 1;
    if (typeof out === "string") window.__stringified.chars += out.length;
    return out;
  };
})();
"""
SIZE = 60_000  # characters of data per message, near the default 64 KiB frame limit
COUNT = 16  # all of them fit the console's kept-messages budget (1 MiB of JSON)


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    if async_playwright is None or not os.access(CHROMIUM, os.X_OK):
        reason = f"needs playwright and {CHROMIUM}; run .ci/install-browser"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (a skip under CI would hide a missing install step)")
        pytest.skip(reason)


def test_a_large_message_costs_its_own_size_and_survives_a_reload(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        a = await open_console(browser, broker.http_url)
        await a.page.add_init_script(COUNT_STRINGIFY)
        await a.page.reload()
        await a.connect(broker.token("1", "Alice"))
        await a.subscribe("big")
        await a.page.evaluate("window.__stringified = { calls: 0, chars: 0 }")

        peer = await Peer.open(broker.url, broker.token("2", "Bob"))
        texts = [f"{i:02d}" + "x" * (SIZE - 2) for i in range(COUNT)]
        for text in texts:
            await peer.request("pub", topic="big", data=text)
        await peer.close()
        await expect(message(a, texts[-1])).to_have_count(1)
        await expect(a.messages()).to_have_count(COUNT)

        spent = await a.page.evaluate("window.__stringified")
        # Each message is serialised for sessionStorage once, plus a small index of seqs;
        # rewriting every kept message each time would be COUNT * (COUNT + 1) / 2 of them.
        assert spent["chars"] <= COUNT * 2 * SIZE, spent
        assert spent["calls"] <= COUNT * 4, spent

        # What was kept comes back after a reload, once each, in seq order.
        await a.page.reload()
        await expect(a.by("status-text")).to_have_text("Connected as Alice")
        await expect(a.messages()).to_have_count(COUNT)
        shown = await a.message_texts()
        assert shown == texts
        a.assert_clean()

    run(scenario)
