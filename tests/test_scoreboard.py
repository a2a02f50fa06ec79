"""examples/scoreboard in real headless Chromium: plain HTML and EventSource against a real
broker (its example config, an on-disk store), fed by the example's publisher through the
HTTP API; a broker restart and a page reload mid-stream, and every update shown exactly
once."""

from __future__ import annotations

import asyncio
import functools
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from broker.client.http import publish

from .support import ROOT, BrokerProcess, free_port, isolated_env
from .test_console import _browser_available, run

# Chromium against broker serve processes, as in test_console.py.
pytestmark = [pytest.mark.process, pytest.mark.browser]

__all__ = ["_browser_available"]  # the autouse fixture: skip (or fail in CI) without a browser

EXAMPLE = ROOT / "examples" / "scoreboard"


@pytest.fixture
def page_server() -> Iterator[str]:
    """The example's files on a static HTTP server of their own (another origin)."""
    handler = functools.partial(_Quiet, directory=str(EXAMPLE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


def run_publisher(broker: BrokerProcess, tmp_path: Path, count: int, seed: int) -> list[int]:
    """The example's publisher, as a user runs it; the seqs it printed."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "publish.py"), "--url", broker.http_url,
         "--token", broker.token("scores", pub=["scores/#"]), "--count", str(count),
         "--interval", "0", "--seed", str(seed)],
        cwd=tmp_path, env=isolated_env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [int(line.split()[0]) for line in proc.stdout.splitlines()]


async def shown(page: Page) -> list[int]:
    seqs: list[int] = await page.evaluate("window.scoreboard.shown()")
    return seqs


async def wait_shown(page: Page, want: list[int], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while sorted(set(await shown(page))) != sorted(want) or len(await shown(page)) < len(want):
        assert asyncio.get_running_loop().time() < deadline, (await shown(page), want)
        await asyncio.sleep(0.1)
    assert await shown(page) == want  # each once, in order


def test_the_scoreboard_loses_nothing_and_repeats_nothing(
    make_broker: Any, tmp_path: Path, page_server: str
) -> None:
    broker: BrokerProcess = make_broker("--config", str(EXAMPLE / "broker.toml"))
    token = broker.token("scores", pub=["scores/#"])
    before = run_publisher(broker, tmp_path, 4, seed=1)

    async def scenario(browser: Browser) -> None:
        context = await browser.new_context()
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{page_server}/?broker={broker.http_url}")
        status = page.get_by_test_id("status")
        await expect(status).to_have_attribute("data-state", "live")
        # The current score of each match first: the latest message of each topic.
        matches = await page.get_by_test_id("match").count()
        latest = await shown(page)
        assert len(latest) == matches and set(latest) <= set(before)
        expected = list(latest)
        expected += run_publisher(broker, tmp_path, 3, seed=2)
        await wait_shown(page, expected)
        # The broker restarts mid-stream: EventSource comes back with Last-Event-ID.
        broker.restart()
        await expect(status).to_have_attribute("data-state", "live", timeout=15_000)
        for i in range(3):
            expected.append(publish(broker.http_url, token, "scores/a-b", {"home": i, "away": 0}))
        await wait_shown(page, expected)
        # The page reloads mid-stream: it resumes from the id it kept.
        await page.reload()
        await expect(status).to_have_attribute("data-state", "live")
        assert await shown(page) == expected  # what it showed, and nothing more
        expected += run_publisher(broker, tmp_path, 3, seed=3)
        await wait_shown(page, expected)
        board = page.locator('[data-testid="match"][data-topic="scores/a-b"]')
        await expect(board.get_by_test_id("score")).to_have_text("2 – 0")
        assert errors == []

    run(scenario)
