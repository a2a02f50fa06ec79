"""Plain HTTP keep-alive connections and the unauthenticated bounds: a socket whose requests
carry no valid token stays unauthenticated for as long as it lives, so a flood of them
displaces only itself; one request with a valid token settles the connection."""

from __future__ import annotations

import socket
import time

from .support import BrokerProcess

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def _answered(s: socket.socket, request: bytes) -> bytes:
    """Send ``request`` and read its whole answer (small, Content-Length framed)."""
    s.sendall(request)
    got = bytearray()
    deadline = time.monotonic() + 10
    while b"\r\n\r\n" not in got and time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    while len(body) < length and time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


def _closed(s: socket.socket, wait: float) -> bool:
    """True when the broker closed ``s`` (within ``wait`` seconds)."""
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_tokenless_keep_alive_sockets_stay_within_the_unauthenticated_bound(
    make_broker: object,
) -> None:
    broker: BrokerProcess = make_broker("--max-unauthenticated-per-address", "4", memory=True)  # type: ignore[operator]
    socks = []
    try:
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
            assert _answered(s, HEALTHZ).startswith(b"HTTP/1.1 200")
            socks.append(s)
        # The six oldest were dropped to make room for the newer ones of the address.
        assert [_closed(s, 3) for s in socks[:6]] == [True] * 6
        assert [_closed(s, 0.2) for s in socks[6:]] == [False] * 4
    finally:
        for s in socks:
            s.close()


def test_a_valid_token_settles_a_keep_alive_connection(make_broker: object) -> None:
    broker: BrokerProcess = make_broker("--max-unauthenticated-per-address", "2", memory=True)  # type: ignore[operator]
    token = broker.token("admin", admin=True)
    stats = (
        b"GET /api/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\n\r\n"
    )
    authed = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    others = []
    try:
        assert _answered(authed, stats).startswith(b"HTTP/1.1 200")
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
            assert _answered(s, HEALTHZ).startswith(b"HTTP/1.1 200")
            others.append(s)
        assert not _closed(authed, 0.3)
        assert _answered(authed, HEALTHZ).startswith(b"HTTP/1.1 200")
        assert _closed(others[0], 3)
    finally:
        authed.close()
        for s in others:
            s.close()
