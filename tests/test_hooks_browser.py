"""Cookie login in real Chromium (Playwright, /usr/bin/chromium): the example application
logs a user in with a session cookie, its page opens a WebSocket to the broker with no
token anywhere, and the broker's ``connect`` hook makes the connection that user's."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from .hooks_support import Backend, hooked_broker
from .support import Peer, free_port

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None  # type: ignore[assignment]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    if async_playwright is None or not os.access(CHROMIUM, os.X_OK):
        reason = "needs playwright and /usr/bin/chromium; run .ci/install-browser"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (a skip under CI would hide a missing install step)")
        pytest.skip(reason)


@pytest.mark.process
def test_cookie_login_with_no_token_in_the_page(tmp_path: Path) -> None:
    port = free_port()
    backend = Backend(tmp_path / "app", broker_url=f"ws://127.0.0.1:{port}/ws").start()
    broker = hooked_broker(tmp_path / "broker", backend, port=port)

    async def scenario() -> None:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = await browser.new_page()
                await page.goto(backend.url + "/")
                await page.fill("input[name=name]", "Alice")
                await page.click("button")
                await expect(page.locator("#state")).to_have_text("connected as alice")
                html = await page.content()
                assert "eyJ" not in html and "token" not in html.lower()  # no JWT, no token
                storage = await page.evaluate("JSON.stringify(localStorage)+document.cookie")
                assert "eyJ" not in storage  # and none stored (the cookie is HttpOnly)

                bob = await Peer.open(broker.url, broker.token("bob"))
                await bob.request("sub", topic="chat/lobby")
                await page.fill("#text", "darn this")
                await page.click("#say button")
                got = await bob.recv()
                assert got["data"] == "d**n this"
                assert got["from"] == {"id": "alice", "name": "Alice"}
                await expect(page.locator("#messages li")).to_have_text(["Alice: d**n this"])
                await page.fill("#text", "spam")
                await page.click("#say button")
                await expect(page.locator("#messages li").nth(1)).to_have_text(
                    "refused: no spam, please"
                )
                await bob.close()
            finally:
                await browser.close()

    try:
        expect.set_options(timeout=8000)
        asyncio.run(asyncio.wait_for(scenario(), 45))
        kinds = [(e["type"], e["user"]["id"]) for e in backend.events()]
        assert ("connect", "alice") in kinds
    finally:
        broker.kill()
        backend.kill()
