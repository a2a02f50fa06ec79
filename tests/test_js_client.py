"""broker.js, the JavaScript client library, in Node and in real Chromium.

Node (Debian's ``nodejs``; ``--experimental-websocket`` on Node 20, plain on 22+) runs the
scripts in ``tests/js/`` against a real ``broker serve`` subprocess; ``tsc --noEmit``
(``typescript`` installed by ``.ci/run`` into ``tests/js/node_modules``) checks
``tests/js/usage.ts`` against ``broker.d.ts``. Without node or tsc these tests skip, except
under CI (``CI=true``), where a skip would hide a missing install step and so fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from .support import ROOT, BrokerProcess, Peer, free_port
from .test_console import CHROMIUM, async_playwright, run

# Node and browsers against broker serve processes.
pytestmark = pytest.mark.process

if async_playwright is not None:
    from playwright.async_api import Browser, Page, expect

JS = ROOT / "tests" / "js"
TSC = JS / "node_modules" / ".bin" / "tsc"

ALICE = ("1", "Alice")
BOB = ("2", "Bob")


def _missing(what: str) -> None:
    reason = f"needs {what}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (a skip under CI would hide a missing install step)")
    pytest.skip(reason)


def node_command() -> list[str]:
    """``node`` with the flag its version needs for a global WebSocket."""
    node = shutil.which("node")
    if node is None:
        _missing("node (apt-get install nodejs)")
        raise AssertionError  # unreachable: _missing raised
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(re.match(r"v(\d+)", version.stdout.strip()).group(1))  # type: ignore[union-attr]
    if major < 20:
        _missing(f"node 20 or newer (found {version.stdout.strip()})")
    return [node, "--experimental-websocket"] if major < 22 else [node]


def run_node(script: str, *args: str, timeout: float = 30) -> dict[str, Any]:
    """Run ``tests/js/<script>``; return the JSON object on its last stdout line."""
    proc = subprocess.run(
        [*node_command(), str(JS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=JS,
    )
    assert proc.returncode == 0, f"node exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_api_in_node(broker: BrokerProcess) -> None:
    out = run_node(
        "api.mjs",
        broker.url,
        broker.token(*ALICE),
        broker.token(*BOB),
        broker.token(*ALICE, ttl=-60),
        f"ws://127.0.0.1:{free_port()}/ws",  # nothing listens there
    )
    assert out["states"] == ["connecting", "connected:1:Alice"]
    assert out["ready"]["recovered"] is True and out["ready"]["resumed"] is False
    assert isinstance(out["ready"]["epoch"], str) and out["ready"]["epoch"]
    # The last two, then the live one: in seq order, each once, with the sender's name.
    assert [g[2] for g in out["got"]] == ["1-0", "1-1", "2-1"]
    assert [g[0] for g in out["got"]] == sorted({g[0] for g in out["got"]})
    assert out["got"][-1][0] == out["live"]
    assert {g[3] for g in out["got"]} == {"Bob"}
    assert out["joins"] == ["2"]
    assert sorted(u["id"] for u in out["presence"]) == ["1", "2"]
    # Errors are classes per code.
    assert out["reserved"]["name"] == "Forbidden" and out["reserved"]["code"] == "forbidden"
    assert out["reservedIsForbidden"] is True
    assert out["badTopic"]["name"] == "BadRequest" and out["badIsBadRequest"] is True
    assert out["inbox"]["name"] == "Forbidden" and out["inboxEnded"] is True
    # A refused token stops the client with the broker's reason.
    assert out["expired"]["name"] == "TokenExpired"
    assert "expired" in out["expired"]["message"]
    assert out["expiredIsTokenExpired"] is True and out["expiredState"] == "failed"
    assert out["expiredEvents"] == [
        {"code": 4001, "willReconnect": False, "reason": out["expired"]["message"]}
    ]
    assert out["nowhere"]["name"] == "ConnectionFailed" and out["nowhereIsConnectionFailed"]
    assert out["afterClose"]["name"] == "ConnectionLost"
    # A new client on the same storage resumes where the first one was.
    assert out["restored"] == ["stored/#"]
    assert out["resumedAfterRestore"] == {
        "messages": ["two", "three"],
        "recovered": True,
        "resumed": True,
    }


def test_node_resumes_across_a_broker_restart_exactly_once(broker: BrokerProcess) -> None:
    count = 400
    proc = subprocess.Popen(
        [
            *node_command(),
            str(JS / "resume.mjs"),
            broker.url,
            broker.token(*ALICE),
            broker.token(*BOB),
            str(count),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=JS,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready = json.loads(proc.stdout.readline())
        assert ready.get("ready") is True, ready
        restart = json.loads(proc.stdout.readline())
        assert restart == {"restart": True}
        assert broker.stop() == 0  # SIGTERM: it drains and exits
        proc.stdin.write("stopped\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"queued": True}
        broker.start()  # the same port and data directory
        proc.stdin.write("started\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"{out}\n{err}"
    done = json.loads(out.strip().splitlines()[-1])
    received = done["received"]
    # Every message exactly once, in seq order, and each published once.
    assert sorted(m["data"] for m in received) == list(range(1, count + 1))
    seqs = [m["seq"] for m in received]
    assert seqs == sorted(set(seqs))
    assert sorted(done["acked"]) == sorted(seqs)
    assert done["subscriberReconnects"] >= 1 and done["publisherReconnects"] >= 1
    assert {"who": "sub", "code": 1001, "willReconnect": True} in done["events"]
    assert not [e for e in done["events"] if "gap" in e]
    assert done["position"]["since"] == max(seqs)


def test_typescript_declarations_fit_real_use() -> None:
    if not TSC.exists():
        _missing("typescript in tests/js/node_modules (npm ci --prefix tests/js)")
    node_command()
    proc = subprocess.run(
        [str(TSC), "--noEmit", "-p", str(JS / "tsconfig.json")],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_npm_pack_holds_only_the_library() -> None:
    npm = shutil.which("npm")
    if npm is None:
        _missing("npm (apt-get install npm)")
        return
    proc = subprocess.run(
        [npm, "pack", "--dry-run", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT / "broker" / "static",
    )
    assert proc.returncode == 0, proc.stderr
    files = {f["path"] for f in json.loads(proc.stdout)[0]["files"]}
    assert files == {"broker.js", "broker.d.ts", "package.json"}


def http_get(port: int, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_library_is_served_for_any_origin_when_none_is_configured(broker: BrokerProcess) -> None:
    r = http_get(broker.port, "/broker.js", {"Origin": "http://app.example"})
    assert r.status == 200
    assert r.getheader("Content-Type") == "text/javascript; charset=utf-8"
    assert r.getheader("Cache-Control") == "public, max-age=300"
    assert r.getheader("Access-Control-Allow-Origin") == "*"
    assert r.getheader("X-Content-Type-Options") == "nosniff"
    body = (ROOT / "broker" / "static" / "broker.js").read_bytes()
    assert r.getheader("Content-Length") == str(len(body))
    d = http_get(broker.port, "/broker.d.ts", {})
    assert d.status == 200 and d.getheader("Content-Type", "").startswith("application/typescript")


def test_library_cors_follows_the_allowed_origins(make_broker: Any) -> None:
    b = make_broker("--allowed-origin", "http://app.example")
    allowed = http_get(b.port, "/broker.js", {"Origin": "http://app.example"})
    assert allowed.getheader("Access-Control-Allow-Origin") == "http://app.example"
    assert allowed.getheader("Vary") == "Origin"
    own = f"http://127.0.0.1:{b.port}"
    assert (
        http_get(b.port, "/broker.js", {"Origin": own}).getheader("Access-Control-Allow-Origin")
        == own
    )
    other = http_get(b.port, "/broker.js", {"Origin": "http://evil.example"})
    assert other.status == 200  # served, but a browser will not let that page use it
    assert other.getheader("Access-Control-Allow-Origin") is None


async def handshake(url: str, origin: str, token: str) -> str:
    """``hello`` when a WebSocket from ``origin`` gets in, else the refusal."""
    try:
        ws = await connect(url, origin=Origin(origin), open_timeout=5)
    except InvalidStatus as exc:
        return f"HTTP {exc.response.status_code}"
    async with ws:
        await ws.send(json.dumps({"op": "auth", "token": token}))
        return str(json.loads(await ws.recv())["op"])


async def test_the_brokers_own_origin_is_always_allowed(make_broker: Any) -> None:
    b = make_broker("--allowed-origin", "http://app.example")
    token = b.token(*ALICE)
    assert await handshake(b.url, "http://app.example", token) == "hello"
    assert await handshake(b.url, f"http://127.0.0.1:{b.port}", token) == "hello"
    assert await handshake(b.url, "http://evil.example", token) == "HTTP 403"
    # Same host, another port: another origin.
    assert await handshake(b.url, f"http://127.0.0.1:{b.port + 1}", token) == "HTTP 403"


# ---- in Chromium ---------------------------------------------------------------------------

HARNESS = """<!doctype html>
<meta charset="utf-8"><title>broker.js harness</title>
<script type="module">
const q = new URLSearchParams(location.search);
// broker.js straight from the broker, as another origin would import it.
const { BrokerClient } = await import(q.get("lib"));
// What arrived, kept across reloads of the tab, as [seq, data] pairs.
const log = JSON.parse(sessionStorage.getItem("log") || "[]");
window.log = log;
window.events = [];
const options = { storage: sessionStorage, backoffInitial: 50, backoffMax: 400 };
if (q.get("token")) options.token = q.get("token");
if (q.get("getToken")) options.getToken = () => window.mintToken();
if (q.get("refreshAt")) options.refreshAt = Number(q.get("refreshAt"));
const client = new BrokerClient(q.get("url"), options);
window.client = client;
for (const type of ["connected", "disconnected", "gap", "error"]) {
  client.on(type, (e) => events.push({
    type, code: e.code ?? null, reason: e.reason ?? null, willReconnect: e.willReconnect ?? null,
    error: e.error ? e.error.name : e instanceof Error ? e.name : null,
  }));
}
for (const pattern of (q.get("subs") || "").split(",").filter(Boolean)) {
  client.subscribe(pattern).on("message", (m) => {
    log.push([m.seq, m.data]);
    sessionStorage.setItem("log", JSON.stringify(log));
  });
}
client.connect().catch(() => {});
</script>
"""


class Relay:
    """A TCP relay between a page and the broker that the test controls: ``shut()`` cuts
    and refuses connections, ``hold`` drops what the broker sends (its acknowledgements
    never arrive), ``paused`` stops reading from the broker (a page that stops reading)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.open = True
        self.hold = False
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pause(self) -> None:
        self.resumed.clear()

    def resume(self) -> None:
        self.resumed.set()

    def shut(self) -> None:
        self.open = False
        for w in list(self.writers):
            w.transport.abort()

    async def __aenter__(self) -> Relay:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.resume()
        self.shut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        sock = socket.socket()
        # A small receive buffer: when the relay stops reading, the broker's buffer fills.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.target_port))
            up_reader, up_writer = await asyncio.open_connection(sock=sock, limit=4096)
        except OSError:
            sock.close()
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while True:
                    if down:
                        await self.resumed.wait()
                    data = await src.read(4096)
                    if not data:
                        break
                    if down and self.hold:
                        continue
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        self.writers -= {writer, up_writer}


@pytest.fixture
def chromium() -> None:
    """Skip (fail under CI) without Chromium and Playwright, as tests/test_console.py does."""
    if async_playwright is None or not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} and the playwright package (run .ci/install-browser)")


@contextlib.contextmanager
def static_site(directory: Path | None = None) -> Iterator[str]:
    """A static HTTP server on loopback: ``directory``, or the harness page at /harness.html."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if directory is not None:
                return super().do_GET()
            body = HARNESS.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    handler = functools.partial(Handler, directory=str(directory or ROOT))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def harness(
    browser: Browser, site: str, broker: BrokerProcess, port: int | None = None, **params: str
) -> Page:
    """The harness page from ``site``: broker.js from ``broker``, connected to ``port``
    (the broker's, or a relay's), logging what it receives."""
    context = await browser.new_context()
    if "getToken" in params:
        await context.expose_function("mintToken", params.pop("mint"))
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    sent: list[dict[str, Any]] = []  # frames the page sent, over all its sockets
    page.sent = sent  # type: ignore[attr-defined]
    page.on(
        "websocket",
        lambda ws: ws.on("framesent", lambda payload: sent.append(json.loads(payload))),
    )
    query = {
        "lib": f"{broker.http_url}/broker.js",
        "url": f"ws://127.0.0.1:{port or broker.port}/ws",
        **params,
    }
    await page.goto(f"{site}/harness.html?{urllib.parse.urlencode(query)}")
    await page.wait_for_function("window.client && window.client.state === 'connected'")
    return page


async def logged(page: Page) -> list[list[Any]]:
    result: list[list[Any]] = await page.evaluate("window.log")
    return result


async def events(page: Page) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await page.evaluate("window.events")
    return result


async def wait_logged(page: Page, count: int) -> list[list[Any]]:
    await page.wait_for_function(f"window.log.length >= {count}", timeout=10_000)
    return await logged(page)


async def history(broker: BrokerProcess, topic: str) -> list[Any]:
    """The data of every message the broker keeps on ``topic``."""
    peer = await Peer.open(broker.url, broker.token("99", "Auditor"))
    ok = await peer.request("sub", topic=topic, last=1000)
    assert ok["op"] == "ok", ok
    data = []
    while len(data) < ok["seq"]:
        try:
            frame = await peer.recv(timeout=0.3)
        except TimeoutError:
            break
        data.append(frame["data"])
    await peer.close()
    return data


@pytest.mark.usefixtures("chromium")
def test_browser_resumes_after_a_slow_consumer_close_exactly_once(make_broker: Any) -> None:
    b = make_broker("--max-queue", "32KiB")

    async def scenario(browser: Browser) -> None:
        async with Relay(b.port) as relay:
            page = await harness(browser, site, b, relay.port, token=b.token(*ALICE), subs="flood")
            peer = await Peer.open(b.url, b.token(*BOB))
            seqs: list[int] = []
            relay.pause()  # the page stops reading
            payload = "x" * 1000
            for batch in range(40):  # at most 40 x 100 KB, far past the page's buffers
                seqs += await publish_batch(peer, "flood", 100, f"{batch}:{payload}")
                if await slow_consumer_closes(b) > 0:
                    break
            assert await slow_consumer_closes(b) == 1
            relay.resume()
            for i in range(len(seqs), len(seqs) + 5):  # and live ones after the resume
                seqs.append((await peer.request("pub", topic="flood", data=f"{i}:"))["seq"])
            await peer.close()
            got = await wait_logged(page, len(seqs))
            assert [seq for seq, _ in got] == seqs  # every one, once, in order
            closes = [e for e in await events(page) if e["type"] == "disconnected"]
            assert closes and closes[0]["code"] == 4008 and closes[0]["willReconnect"], closes
            assert [e["type"] for e in await events(page)].count("gap") == 0
            assert page.errors == []  # type: ignore[attr-defined]

    with static_site() as site:
        run(scenario)


async def publish_batch(peer: Peer, topic: str, count: int, data: str) -> list[int]:
    """Publish ``count`` messages pipelined; their seqs once all are acknowledged."""
    ids = [f"batch-{i}" for i in range(count)]
    for rid in ids:
        await peer.send({"op": "pub", "id": rid, "topic": topic, "data": data})
    seqs = {}
    while len(seqs) < count:
        frame = await peer.recv()
        assert frame["op"] == "ok", frame
        seqs[frame["id"]] = frame["seq"]
    return [seqs[rid] for rid in ids]


async def slow_consumer_closes(broker: BrokerProcess) -> float:
    def fetch() -> float:
        conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        found = re.search(r"^broker_slow_consumer_closes(?:_total)? (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    return await asyncio.to_thread(fetch)


@pytest.mark.usefixtures("chromium")
def test_browser_refreshes_an_expiring_token_in_place_and_after_4003(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser, refresh_at: str) -> Page:
        topic = f"news/{refresh_at}"
        minted: list[str] = []

        def mint() -> str:
            minted.append(broker.token(*ALICE, ttl=3))
            return minted[-1]

        page = await harness(
            browser, site, broker, getToken="1", mint=mint, subs=topic, refreshAt=refresh_at
        )
        assert len(minted) == 1
        peer = await Peer.open(broker.url, broker.token(*BOB))
        seqs = [(await peer.request("pub", topic=topic, data="before"))["seq"]]
        # Past the first token's exp: the page has a new one, one way or the other.
        past = decode_exp(minted[0]) * 1000 + 300
        await page.wait_for_function(
            f"window.client.state === 'connected' && Date.now() > {past}", timeout=10_000
        )
        assert len(minted) >= 2
        seqs.append((await peer.request("pub", topic=topic, data="after"))["seq"])
        await peer.close()
        got = await wait_logged(page, 2)
        assert [seq for seq, _ in got] == seqs  # each once, none lost
        return page

    async def both(browser: Browser) -> None:
        in_place, late = await asyncio.gather(
            scenario(browser, "0.6"),  # refreshed before exp
            scenario(browser, "3"),  # refresh planned after exp: the broker closes first
        )
        # An auth frame with an id on the same connection, answered ok; no disconnect.
        assert [e["type"] for e in await events(in_place)] == ["connected"]
        refreshes = [f for f in in_place.sent if f["op"] == "auth" and "id" in f]  # type: ignore[attr-defined]
        assert refreshes, in_place.sent  # type: ignore[attr-defined]
        # Closed with 4003 at exp: a new token from getToken, and the subscription resumed.
        late_events = [(e["type"], e["code"]) for e in await events(late)]
        assert late_events[:3] == [
            ("connected", None),
            ("disconnected", 4003),
            ("connected", None),
        ], late_events
        resumed = [f for f in late.sent if f["op"] == "sub"][1:]  # type: ignore[attr-defined]
        assert resumed and isinstance(resumed[0].get("since"), int), resumed

    with static_site() as site:
        run(both)


def decode_exp(token: str) -> int:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return int(claims["exp"])


@pytest.mark.usefixtures("chromium")
def test_browser_publish_whose_ok_is_lost_is_recorded_once(broker: BrokerProcess) -> None:
    async def scenario(browser: Browser) -> None:
        async with Relay(broker.port) as relay:
            page = await harness(browser, site, broker, relay.port, token=broker.token(*ALICE))
            relay.hold = True  # what the broker sends from now on never reaches the page
            await page.evaluate(
                """window.published = null;
                   client.publish("orders", "order-1").then((seq) => { window.published = seq; });
                   undefined"""
            )
            # The broker recorded it (and answered into the void) ...
            for _ in range(100):
                if await history(broker, "orders") == ["order-1"]:
                    break
            assert await history(broker, "orders") == ["order-1"]
            # ... then the connection drops before the page saw the ok. It reconnects and
            # sends the publish again, with the same key.
            relay.shut()
            relay.hold = False
            relay.open = True
            await page.wait_for_function("window.published !== null", timeout=10_000)
            assert await history(broker, "orders") == ["order-1"]
            pubs = [f for f in page.sent if f.get("op") == "pub"]  # type: ignore[attr-defined]
            assert len(pubs) == 2 and pubs[0]["key"] == pubs[1]["key"], pubs
            disconnects = [e for e in await events(page) if e["type"] == "disconnected"]
            assert disconnects and disconnects[0]["willReconnect"], disconnects

    with static_site() as site:
        run(scenario)


@pytest.mark.usefixtures("chromium")
def test_two_pages_chat_with_the_web_example(broker: BrokerProcess) -> None:
    """examples/web on another origin (any static server), importing /broker.js."""

    async def join(browser: Browser, user: tuple[str, str]) -> Page:
        page = await (await browser.new_context()).new_page()
        page.errors = []  # type: ignore[attr-defined]
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))  # type: ignore[attr-defined]
        await page.goto(f"{site}/?broker={broker.url}")
        await page.get_by_test_id("token").fill(broker.token(*user))
        await page.get_by_test_id("join").click()
        await expect(page.get_by_test_id("status")).to_have_text(f"Connected as {user[1]}")
        return page

    async def say(page: Page, text: str, to: str = "") -> None:
        await page.get_by_test_id("to").fill(to)
        await page.get_by_test_id("text").fill(text)
        await page.get_by_test_id("send").click()
        await expect(page.get_by_test_id("send-result")).to_contain_text("sent #")

    def texts(page: Page) -> Any:
        return page.get_by_test_id("message-text")

    async def scenario(browser: Browser) -> None:
        alice = await join(browser, ALICE)
        bob = await join(browser, BOB)
        await expect(alice.get_by_test_id("person")).to_have_count(2)
        await say(alice, "hi all")
        await say(bob, "hello Alice")
        await say(bob, "<b>just between us</b>", to="1")
        for page in (alice, bob):
            await expect(texts(page)).to_have_text(
                ["hi all", "hello Alice", "<b>just between us</b>"]
            )
        direct = alice.locator('[data-testid="message"][data-direct="true"]')
        await expect(direct).to_have_count(1)
        # Bob leaves: Alice's list of people follows.
        await bob.close()
        await expect(alice.get_by_test_id("person")).to_have_count(1)
        # Alice reloads: she rejoins by herself, sees what she saw, and what was said
        # meanwhile, each once.
        peer = await Peer.open(broker.url, broker.token("3", "Carol"))
        await alice.reload()
        await peer.request("pub", topic="chat/lobby", data="Carol was here")
        await peer.close()
        await expect(alice.get_by_test_id("status")).to_have_text("Connected as Alice")
        await expect(texts(alice)).to_have_text(
            ["hi all", "hello Alice", "<b>just between us</b>", "Carol was here"]
        )
        assert alice.errors == []  # type: ignore[attr-defined]

    with static_site(ROOT / "examples" / "web") as site:
        run(scenario)
