"""The own-origin rule and DNS rebinding: a page at an attacker's host name that resolves
to the broker sends that name in both ``Host`` and ``Origin``; with ``allowed_origin`` set,
neither the WebSocket handshake, the HTTP API nor ``/metrics`` answers it. The broker's own
origin is trusted by ``Host`` only for loopback names."""

from __future__ import annotations

import http.client
import socket

import pytest

from broker.server.http import loopback_host, origin_allowed

from .support import BrokerProcess

ALLOWED = ["https://app.example"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:8765", True),
        ("console.localhost:80", True),
        ("127.0.0.1:8765", True),
        ("127.1.2.3", True),
        ("[::1]:8765", True),
        ("::1", True),
        ("evil.example:8765", False),
        ("10.0.0.5:8765", False),
        ("[2001:db8::1]:8765", False),
        ("localhost.evil.example", False),
        ("", False),
    ],
)
def test_loopback_host(host: str, loopback: bool) -> None:
    assert loopback_host(host) is loopback


def test_own_origin_is_trusted_only_for_loopback_hosts() -> None:
    assert origin_allowed(["http://127.0.0.1:8765"], ["127.0.0.1:8765"], ALLOWED)
    assert origin_allowed(["http://localhost:8765"], ["localhost:8765"], ALLOWED)
    assert not origin_allowed(["http://evil.example:8765"], ["evil.example:8765"], ALLOWED)
    assert origin_allowed(["https://app.example"], ["evil.example:8765"], ALLOWED)
    # No list: any origin, as before.
    assert origin_allowed(["http://evil.example:8765"], ["evil.example:8765"], [])


def _status(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def _rebound(method: str, target: str, port: int, extra: str = "") -> bytes:
    name = f"evil.example:{port}"
    return (
        f"{method} {target} HTTP/1.1\r\nHost: {name}\r\nOrigin: http://{name}\r\n{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def test_a_rebound_page_is_refused_everywhere(make_broker: object) -> None:
    broker: BrokerProcess = make_broker("--allowed-origin", ALLOWED[0], memory=True)  # type: ignore[operator]
    port = broker.port
    token = broker.token("1", admin=True)
    handshake = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Authorization: Bearer {token}\r\n"
    )
    assert _status(port, _rebound("GET", "/ws", port, handshake)) == 403
    auth = f"Authorization: Bearer {token}\r\n"
    assert _status(port, _rebound("GET", "/api/stats", port, auth)) == 403
    assert _status(port, _rebound("GET", "/metrics", port)) == 403
    # The same requests from the broker's loopback origin are answered.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert conn.getresponse().status == 200
    conn.close()
