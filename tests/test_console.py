"""End-to-end tests of the browser console at ``GET /`` in real headless Chromium.

Debian's ``chromium`` driven by Playwright for Python (``.ci/install-browser`` installs
both; Playwright never downloads a browser of its own here). Every test talks to a real
``broker serve`` subprocess (the ``broker`` fixture); raw protocol clients
(``tests.support.Peer``) publish from outside the page where a test needs it.

Without chromium or Playwright the tests are skipped, except under CI (``CI=true``), where
a skip would hide a missing install step and so fails instead.

The screenshot test writes to a temporary directory; ``BROKER_REFRESH_SCREENSHOT=1``
makes it refresh the README's ``docs/console.png`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from broker.core.auth import mint_token

from .support import ROOT, BrokerProcess, Peer, free_port

# Chromium against broker serve processes.
pytestmark = [pytest.mark.process, pytest.mark.browser]

try:
    from playwright.async_api import Browser, Locator, Page, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None  # type: ignore[assignment]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The README's picture of the console; the screenshot test rewrites it only when
#: BROKER_REFRESH_SCREENSHOT=1 asks for it, so a test run leaves the checkout clean.
DOC_SCREENSHOT = ROOT / "docs" / "console.png"
TIMEOUT_MS = 8000  # for each wait on the page
TEST_BUDGET_S = 30.0  # hard cap on one test, far above what each one needs

ALICE = ("1", "Alice")
BOB = ("2", "Bob")


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    missing = []
    if async_playwright is None:
        missing.append("the playwright package (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        reason = "browser tests need " + " and ".join(missing) + "; run .ci/install-browser"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (a skip under CI would hide a missing install step)")
        pytest.skip(reason)


def run(scenario: Callable[[Browser], Awaitable[None]]) -> None:
    """Run ``scenario`` with a fresh headless Chromium, within ``TEST_BUDGET_S``."""

    async def main() -> None:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            try:
                await asyncio.wait_for(scenario(browser), TEST_BUDGET_S)
            finally:
                await browser.close()

    expect.set_options(timeout=TIMEOUT_MS)
    asyncio.run(main())


class Console:
    """One browser tab on the console, with helpers that use the page as a person would."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._on_console)
        page.on("request", lambda r: self.requests.append(r.url))
        self.sent: list[dict[str, Any]] = []  # frames the page sent, over all its sockets
        page.on("websocket", self._on_websocket)

    def _on_websocket(self, ws: Any) -> None:
        def sent(payload: str | bytes) -> None:
            with contextlib.suppress(ValueError, TypeError):
                self.sent.append(json.loads(payload))

        ws.on("framesent", sent)

    def _on_console(self, msg: Any) -> None:
        # Chromium logs each failed WebSocket attempt itself, and each failed look at
        # /healthz that broker.js takes to tell "down" from "refused"; reconnecting makes some.
        if msg.type != "error" or msg.text.startswith("WebSocket connection to"):
            return
        if str((msg.location or {}).get("url", "")).endswith("/healthz"):
            return
        self.errors.append(msg.text)

    def by(self, testid: str) -> Locator:
        return self.page.get_by_test_id(testid)

    @property
    def status(self) -> Locator:
        return self.by("status")

    def messages(self) -> Locator:
        return self.by("messages").get_by_test_id("message")

    def sub_row(self, pattern: str) -> Locator:
        return self.page.locator(f'[data-testid="sub"][data-pattern="{pattern}"]')

    async def connect(self, token: str, *, expect_state: str = "connected") -> None:
        await self.by("token").fill(token)
        await self.by("connect").click()
        await expect(self.status).to_have_attribute("data-state", expect_state)

    async def subscribe(self, pattern: str, last: int | None = None) -> None:
        await self.by("sub-topic").fill(pattern)
        if last is not None:
            await self.by("sub-last").fill(str(last))
        await self.by("sub-button").click()
        await expect(self.sub_row(pattern)).to_have_attribute("data-state", "active")

    async def publish(self, topic: str, text: str, *, as_json: bool = False) -> int:
        """Publish through the form; return the seq shown in the acknowledgement."""
        await self.by("pub-topic").fill(topic)
        await self.by("pub-data").fill(text)
        await self.by("pub-json").set_checked(as_json)
        await self.by("pub-button").click()
        result = self.by("pub-result")
        await expect(result).to_have_attribute("data-kind", "ok")
        return int((await result.inner_text()).rsplit("seq", 1)[1])

    async def direct(self, user_id: str, text: str) -> None:
        await self.by("dm-to").fill(user_id)
        await self.by("dm-data").fill(text)
        await self.by("dm-button").click()
        await expect(self.by("dm-result")).to_have_attribute("data-kind", "ok")

    async def message_texts(self) -> list[str]:
        return await self.messages().get_by_test_id("msg-data").all_inner_texts()

    def assert_clean(self) -> None:
        """No script errors, and no request went anywhere but the broker."""
        assert self.errors == [], self.errors
        foreign = [u for u in self.requests if not u.startswith(self.base_url + "/")]
        assert foreign == [], foreign


async def open_console(
    browser: Browser,
    base_url: str,
    *,
    width: int = 1200,
    height: int = 760,
) -> Console:
    context = await browser.new_context(
        viewport={"width": width, "height": height},
        device_scale_factor=1,
        color_scheme="light",
        reduced_motion="reduce",
        locale="en-GB",
        timezone_id="UTC",
    )
    page = await context.new_page()
    console = Console(page, base_url)
    response = await page.goto(base_url + "/")
    assert response is not None and response.ok, response
    return console


def message(console: Console, data: str) -> Locator:
    return console.messages().filter(
        has=console.page.get_by_test_id("msg-data").get_by_text(data, exact=True)
    )


# ---- tests -------------------------------------------------------------------------------


def test_page_and_assets_are_served(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        a = await open_console(browser, broker.http_url)
        assert await a.page.title() == "broker console"
        # The stylesheet and the script loaded (the script sets the initial state text).
        await expect(a.by("status-text")).to_have_text("Not connected")
        color = await a.page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert color != "rgba(0, 0, 0, 0)"
        a.assert_clean()
        assert a.requests[:1] == [broker.http_url + "/"]

    run(scenario)


def test_two_users_subscribe_and_publish(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        a = await open_console(browser, broker.http_url)
        b = await open_console(browser, broker.http_url)
        await a.connect(broker.token(*ALICE))
        await expect(a.by("status-text")).to_have_text("Connected as Alice")
        await b.connect(broker.token(*BOB))
        await expect(b.by("status-text")).to_have_text("Connected as Bob")

        await a.subscribe("football")
        await b.subscribe("football")
        seq = await b.publish("football", "2-1")

        got = message(a, "2-1")
        await expect(got).to_have_count(1)
        await expect(got).to_have_attribute("data-seq", str(seq))
        await expect(got).to_have_attribute("data-topic", "football")
        await expect(got).to_have_attribute("data-own", "false")
        await expect(got.get_by_test_id("msg-from")).to_have_text("Bob")
        await expect(got.get_by_test_id("msg-topic")).to_have_text("football")
        await expect(got.get_by_test_id("msg-time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
        # The publisher sees its own message (published with echo) marked as its own.
        mine = message(b, "2-1")
        await expect(mine).to_have_attribute("data-own", "true")
        await expect(mine.get_by_test_id("msg-own")).to_be_visible()

        # JSON when chosen and valid; an invalid JSON text is refused in the page.
        await b.publish("football", '{"home": 3, "away": 1}', as_json=True)
        await expect(message(a, '{"home":3,"away":1}')).to_have_count(1)
        await b.by("pub-data").fill("{not json")
        await b.by("pub-button").click()
        await expect(b.by("pub-result")).to_have_attribute("data-kind", "error")
        await expect(b.by("pub-result")).to_contain_text("JSON")

        # An error reply from the broker is shown: publishing to a reserved topic.
        await b.by("pub-json").set_checked(False)
        await b.by("pub-topic").fill("$sys")
        await b.by("pub-data").fill("x")
        await b.by("pub-button").click()
        await expect(b.by("pub-result")).to_have_attribute("data-kind", "error")
        await expect(b.by("pub-result")).to_contain_text("forbidden")

        # Removing a subscription stops its messages.
        await a.sub_row("football").get_by_test_id("sub-remove").click()
        await expect(a.sub_row("football")).to_have_count(0)
        await b.publish("football", "3-1")
        await expect(message(b, "3-1")).to_have_count(1)
        await a.page.wait_for_timeout(300)
        await expect(message(a, "3-1")).to_have_count(0)
        assert await a.message_texts() == ["2-1", '{"home":3,"away":1}']

        a.assert_clean()
        b.assert_clean()

    run(scenario)


def test_direct_message_reaches_the_inbox(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        a = await open_console(browser, broker.http_url)
        b = await open_console(browser, broker.http_url)
        await a.connect(broker.token(*ALICE))
        await b.connect(broker.token(*BOB))
        # The own inbox is subscribed right after hello, without being asked.
        await expect(a.sub_row("user/1")).to_have_attribute("data-state", "active")
        await expect(a.by("my-inbox")).to_have_text("user/1")
        await expect(b.sub_row("user/2")).to_have_attribute("data-state", "active")

        await b.direct("1", "psst, Alice")
        got = message(a, "psst, Alice")
        await expect(got).to_have_count(1)
        await expect(got).to_have_attribute("data-topic", "user/1")
        await expect(got.get_by_test_id("msg-from")).to_have_text("Bob")
        await expect(got.get_by_test_id("msg-direct")).to_be_visible()
        # Bob's page shows what he sent (his own, outgoing), once.
        sent = message(b, "psst, Alice")
        await expect(sent).to_have_count(1)
        await expect(sent).to_have_attribute("data-own", "true")
        await expect(b.by("dm-result")).to_contain_text("user/1")

        # A user id that cannot name an inbox is refused in the page.
        await b.by("dm-to").fill("a/b")
        await b.by("dm-data").fill("x")
        await b.by("dm-button").click()
        await expect(b.by("dm-result")).to_have_attribute("data-kind", "error")
        a.assert_clean()
        b.assert_clean()

    run(scenario)


class GateProxy:
    """A TCP relay in front of the broker that the test can shut, so that the page
    stays disconnected while messages are published behind its back."""

    def __init__(self, target_port: int, rewrite_host: str | None = None) -> None:
        self.target_port = target_port
        # A reverse proxy that sends its own Host upstream (as nginx without
        # `proxy_set_header Host $host` does): the page's origin is not the broker's then.
        self.rewrite_host = rewrite_host
        self.port = free_port()
        self.open = True
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> GateProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        self.shut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def shut(self) -> None:
        """Refuse new connections and cut the ones open."""
        self.open = False
        for w in list(self.writers):
            w.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        host = f"Host: 127.0.0.1:{self.port}\r\n".encode()

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool
        ) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if upstream and self.rewrite_host is not None:
                        data = data.replace(host, f"Host: {self.rewrite_host}\r\n".encode())
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self.writers -= {writer, up_writer}


@contextlib.asynccontextmanager
async def gate_proxy(port: int, rewrite_host: str | None = None) -> AsyncIterator[GateProxy]:
    proxy = await GateProxy(port, rewrite_host).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def test_resumes_after_broker_restart_without_duplicates(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        async with gate_proxy(broker.port) as proxy:
            a = await open_console(browser, proxy.http_url)
            await a.connect(broker.token(*ALICE))
            await a.subscribe("football")
            peer = await Peer.open(broker.url, broker.token(*BOB))
            ok = await peer.request("pub", topic="football", data="before")
            assert ok["op"] == "ok", ok
            await expect(message(a, "before")).to_have_count(1)
            await peer.close()

            # The broker restarts (same port and data directory) while the page cannot
            # reach it; three messages are published meanwhile.
            before_seq = int(await message(a, "before").get_attribute("data-seq") or -1)
            first_sub = next(f for f in a.sent if f.get("op") == "sub" and f["topic"] == "football")
            assert "since" not in first_sub and "last" not in first_sub, first_sub
            sent_before = len(a.sent)

            proxy.shut()
            await asyncio.to_thread(broker.restart)
            await expect(a.status).to_have_attribute("data-state", "reconnecting")
            await expect(a.by("status-text")).to_have_text("Reconnecting…")
            peer = await Peer.open(broker.url, broker.token(*BOB))
            seqs = []
            for text in ("during 1", "during 2", "during 3"):
                ok = await peer.request("pub", topic="football", data=text)
                assert ok["op"] == "ok", ok
                seqs.append(ok["seq"])

            proxy.open = True
            await expect(a.status).to_have_attribute("data-state", "connected", timeout=12000)
            await expect(a.sub_row("football")).to_have_attribute("data-state", "active")
            # It resumed: `since` = the last seq it had seen, with the epoch of its sub's ok.
            resumed = [f for f in a.sent[sent_before:] if f.get("op") == "sub"]
            football = [f for f in resumed if f["topic"] == "football"]
            assert football, resumed
            assert football[0]["since"] == before_seq, football
            assert isinstance(football[0]["epoch"], str) and football[0]["epoch"], football
            assert {f["topic"] for f in resumed} == {"football", "user/1"}, resumed
            for text, seq in zip(("during 1", "during 2", "during 3"), seqs):
                got = message(a, text)
                await expect(got).to_have_count(1)
                await expect(got).to_have_attribute("data-seq", str(seq))

            # Live delivery goes on after the resume, and nothing was rendered twice.
            ok = await peer.request("pub", topic="football", data="after")
            await expect(message(a, "after")).to_have_count(1)
            await a.page.wait_for_timeout(300)
            assert await a.message_texts() == [
                "before",
                "during 1",
                "during 2",
                "during 3",
                "after",
            ]
            rendered = await a.messages().evaluate_all(
                "rows => rows.map(r => Number(r.dataset.seq))"
            )
            assert rendered == sorted(set(rendered)), rendered
            await peer.close()
            a.assert_clean()

    run(scenario)


def test_script_payload_is_shown_as_text(broker: BrokerProcess) -> None:
    payload = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2">'

    async def scenario(browser: Browser) -> None:
        a = await open_console(browser, broker.http_url)
        await a.connect(broker.token(*ALICE))
        await a.subscribe("football")
        # The sender's name carries markup too: it is rendered as text as well.
        peer = await Peer.open(broker.url, broker.token("3", "<b>Mallory</b>"))
        assert (await peer.request("pub", topic="football", data=payload))["op"] == "ok"
        assert (await peer.request("pub", topic="football", data={"html": payload}))["op"] == "ok"
        await peer.close()

        await expect(a.messages()).to_have_count(2)
        data = a.messages().get_by_test_id("msg-data")
        await expect(data.nth(0)).to_have_text(payload)
        await expect(data.nth(1)).to_contain_text('"html":"<script>')
        await expect(a.messages().first.get_by_test_id("msg-from")).to_have_text("<b>Mallory</b>")
        # No element was made from the payload, and nothing in it ran.
        await a.page.wait_for_timeout(200)
        assert await a.by("messages").locator("script, img, b").count() == 0
        assert await a.page.evaluate("window.__pwned") is None
        a.assert_clean()

    run(scenario)


def test_refused_token_shows_the_reason(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        a = await open_console(browser, broker.http_url)
        expired = broker.token(*ALICE, ttl=-60)
        await a.connect(expired, expect_state="refused")
        await expect(a.by("status-text")).to_contain_text("token expired")

        forged = mint_token("not-the-broker-secret-0123456789abcdef", *ALICE)
        await a.connect(forged, expect_state="refused")
        await expect(a.by("status-text")).to_contain_text("invalid signature")
        # A refusal is final: the page does not keep knocking.
        await a.page.wait_for_timeout(700)
        await expect(a.status).to_have_attribute("data-state", "refused")

        # The same tab then connects with a good token.
        await a.connect(broker.token(*ALICE))
        await expect(a.by("status-text")).to_have_text("Connected as Alice")
        a.assert_clean()

    run(scenario)


async def tab_to(page: Page, selector: str, limit: int = 40) -> None:
    """Press Tab until the element matching the CSS ``selector`` has the focus."""
    for _ in range(limit):
        await page.keyboard.press("Tab")
        if await page.evaluate(
            "s => !!document.activeElement && document.activeElement.matches(s)", selector
        ):
            return
    raise AssertionError(f"{selector} cannot be reached with the Tab key")


def test_keyboard_only_on_a_phone_width_screen(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        peer = await Peer.open(broker.url, broker.token(*BOB))
        for score in ("0-0", "1-0", "1-1"):
            assert (await peer.request("pub", topic="scores", data=score))["op"] == "ok"
        await peer.close()

        a = await open_console(browser, broker.http_url, width=375, height=740)
        page = a.page
        # Every form control has a label.
        unlabelled = await page.evaluate(
            """[...document.querySelectorAll('input, textarea, select')]
                 .filter(e => e.labels.length === 0 && !e.getAttribute('aria-label'))
                 .map(e => e.id)"""
        )
        assert unlabelled == []

        await tab_to(page, "#token")
        await page.keyboard.type(broker.token(*ALICE))
        await page.keyboard.press("Enter")
        await expect(a.status).to_have_attribute("data-state", "connected")

        # Subscribe with a replay of the last two messages.
        await tab_to(page, "#sub-topic")
        await page.keyboard.type("scores")
        await page.keyboard.press("Tab")
        await page.keyboard.type("2")
        await page.keyboard.press("Enter")
        await expect(a.sub_row("scores")).to_have_attribute("data-state", "active")
        await expect(a.messages()).to_have_count(2)
        assert await a.message_texts() == ["1-0", "1-1"]
        # Subscribing again with a longer replay adds the older one in its place, once.
        await page.keyboard.type("scores")
        await page.keyboard.press("Tab")
        await page.keyboard.type("3")
        await page.keyboard.press("Enter")
        await expect(a.messages()).to_have_count(3)
        await a.page.wait_for_timeout(200)
        assert await a.message_texts() == ["0-0", "1-0", "1-1"]

        # Publish to it: Enter in the message box sends.
        await tab_to(page, "#pub-topic")
        await page.keyboard.type("scores")
        await page.keyboard.press("Tab")
        await page.keyboard.type("2-1")
        await page.keyboard.press("Enter")
        await expect(a.by("pub-result")).to_have_attribute("data-kind", "ok")
        await expect(message(a, "2-1")).to_have_attribute("data-own", "true")

        # Remove the subscription with the keyboard.
        await tab_to(page, '[data-pattern="scores"] [data-testid="sub-remove"]')
        await page.keyboard.press("Enter")
        await expect(a.sub_row("scores")).to_have_count(0)

        # Nothing sticks out sideways at phone width.
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"{overflow}px of horizontal overflow at 375px"
        a.assert_clean()

    run(scenario)


def test_token_is_remembered_in_the_tab(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        a = await open_console(browser, broker.http_url)
        token = broker.token(*ALICE)
        await a.connect(token)
        await a.page.reload()
        await expect(a.by("token")).to_have_value(token)
        # A connected tab that is reloaded connects again by itself, with the kept token.
        await expect(a.by("status-text")).to_have_text("Connected as Alice")
        stored = await a.page.evaluate("Object.keys(localStorage).length")
        assert stored == 0  # session storage only

        # Disconnected by choice, it stays disconnected, across a reload too.
        await a.by("disconnect").click()
        await expect(a.status).to_have_attribute("data-state", "idle")
        await expect(a.by("status-text")).to_have_text("Disconnected")
        await a.page.reload()
        await expect(a.by("token")).to_have_value(token)
        await expect(a.by("status-text")).to_have_text("Not connected")
        await a.page.wait_for_timeout(600)
        await expect(a.status).to_have_attribute("data-state", "idle")
        await expect(a.by("pub-button")).to_be_disabled()
        a.assert_clean()

    run(scenario)


def test_screenshot_of_two_users_chatting(broker: BrokerProcess, tmp_path: Path) -> None:
    refresh = os.environ.get("BROKER_REFRESH_SCREENSHOT") == "1"
    screenshot = DOC_SCREENSHOT if refresh else tmp_path / "console.png"

    async def scenario(browser: Browser) -> None:
        a = await open_console(browser, broker.http_url, width=1200, height=760)
        b = await open_console(browser, broker.http_url, width=1200, height=760)
        await a.connect(broker.token(*ALICE))
        await b.connect(broker.token(*BOB))
        for c in (a, b):
            await c.subscribe("chat/lobby")
            await c.subscribe("scores/#", last=5)
        lines = [
            (b, "Anyone watching the match tonight?"),
            (a, "Yes! Kick-off at 20:00."),
            (b, "2-1 at half time, what a goal"),
            (a, "Saw it. Unbelievable strike."),
        ]
        for who, text in lines:
            await who.publish("chat/lobby", text)
            await expect(message(a, text)).to_have_count(1)
        await b.publish(
            "scores/uk/premier",
            '{"home": "Arsenal", "away": "Spurs", "score": [2, 1]}',
            as_json=True,
        )
        await b.direct("1", "Pub after the game?")
        await expect(a.messages()).to_have_count(6)
        await a.by("pub-topic").fill("chat/lobby")
        await a.by("dm-to").fill("2")
        await a.page.evaluate("document.activeElement && document.activeElement.blur()")
        await a.page.evaluate("window.scrollTo(0, 0)")
        await a.page.screenshot(path=str(screenshot), animations="disabled", caret="hide")
        assert screenshot.stat().st_size > 10_000
        a.assert_clean()
        b.assert_clean()

    run(scenario)


def test_reload_mid_stream_loses_and_repeats_nothing(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        a = await open_console(browser, broker.http_url)
        await a.connect(broker.token(*ALICE))
        await a.subscribe("football")
        peer = await Peer.open(broker.url, broker.token(*BOB))
        seqs: dict[str, int] = {}

        async def publish(first: int, last: int) -> None:
            for i in range(first, last):
                ok = await peer.request("pub", topic="football", data=f"m{i}")
                seqs[f"m{i}"] = ok["seq"]

        await publish(0, 10)
        await expect(message(a, "m9")).to_have_count(1)
        sent_before = len(a.sent)
        # The page reloads while the stream goes on, and a direct message arrives meanwhile.
        await asyncio.gather(a.page.reload(), publish(10, 25))
        dm = await peer.request("pub", topic="user/1", data="psst, during the reload")
        await publish(25, 35)
        await peer.close()

        await expect(a.by("status-text")).to_have_text("Connected as Alice")
        await expect(message(a, "psst, during the reload")).to_have_count(1)
        await expect(message(a, "m34")).to_have_count(1)
        await expect(a.messages()).to_have_count(36)
        texts = await a.message_texts()
        expected = sorted([*seqs, "psst, during the reload"], key=lambda t: seqs.get(t, dm["seq"]))
        assert texts == expected
        rendered = await a.messages().evaluate_all("rows => rows.map(r => Number(r.dataset.seq))")
        assert rendered == sorted(set(rendered))
        # The reloaded page resumed each subscription from where it was: `since` and `epoch`.
        resumed = [f for f in a.sent[sent_before:] if f.get("op") == "sub"]
        assert {f["topic"] for f in resumed} == {"football", "user/1"}, resumed
        assert all(isinstance(f.get("since"), int) and f.get("epoch") for f in resumed), resumed
        football = next(f for f in resumed if f["topic"] == "football")
        assert seqs["m9"] <= football["since"] < seqs["m34"]
        await expect(a.sub_row("football")).to_have_attribute("data-state", "active")
        a.assert_clean()

    run(scenario)


def test_messages_come_first_on_a_phone(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        a = await open_console(browser, broker.http_url, width=390, height=844)
        await a.connect(broker.token(*ALICE))
        await a.subscribe("football")
        messages = await a.page.locator(".messages-card").bounding_box()
        controls = await a.page.locator(".controls").bounding_box()
        assert messages is not None and controls is not None
        assert messages["y"] < controls["y"]
        assert messages["y"] < 120, messages  # right under the top bar, not 1,860 px down
        overflow = await a.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        a.assert_clean()

    run(scenario)


def test_a_refusal_by_the_origin_check_is_named(make_broker: Any) -> None:
    b = make_broker("--allowed-origin", "https://app.example")

    async def scenario(browser: Browser) -> None:
        # The console opened through a proxy that does not pass the page's Host on: its
        # origin is neither the broker's own nor in the list.
        async with gate_proxy(b.port, rewrite_host="broker.internal:8765") as proxy:
            a = await open_console(browser, proxy.http_url)
            await a.connect(b.token(*ALICE), expect_state="reconnecting")
            await expect(a.by("status-text")).to_have_text("Refused by the broker's origin check")
            await expect(a.by("conn-detail")).to_contain_text(f"origin {proxy.http_url}")
            await expect(a.by("conn-detail")).not_to_contain_text("Cannot reach")
            a.assert_clean()
        # Opened from the broker itself, the console is always allowed.
        direct = await open_console(browser, b.http_url)
        await direct.connect(b.token(*ALICE))
        direct.assert_clean()

    run(scenario)
