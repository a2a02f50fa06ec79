"""broker.js, the JavaScript client library, in Node and in real Chromium.

Node (Debian's ``nodejs``; ``--experimental-websocket`` on Node 20, plain on 22+) runs the
scripts in ``tests/js/`` against a real ``broker serve`` subprocess; ``tsc --noEmit``
(``typescript`` installed by ``.ci/run`` into ``tests/js/node_modules``) checks
``tests/js/usage.ts`` against ``broker.d.ts``. Without node or tsc these tests skip, except
under CI (``CI=true``), where a skip would hide a missing install step and so fails.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from .support import ROOT, BrokerProcess, free_port

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
        _missing("typescript in tests/js/node_modules (npm install --prefix tests/js typescript@5)")
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
