"""A server-sent event stream whose client has gone (section 11 of docs/protocol.md) is
noticed at once, not at the next comment line: a closed socket, a half-close or any byte
sent after the request end the stream and give back what it held (the ``broker_sse_streams``
and ``broker_anonymous_connections`` gauges, the connection and anonymous caps, the hook
``disconnect`` event); and an anonymous stream the subscribe hook refuses gives its
anonymous slot back. Raw sockets against real ``broker serve`` processes."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .hooks_support import HOOK_SECRET, Backend, hooked_broker
from .support import PUBLIC_SCORES, BrokerProcess, wait_for

#: Well under the 10 s between comment lines, the only other way a departure is noticed.
GONE_WITHIN = 2.0


def open_stream(broker: BrokerProcess, query: str, token: str | None = None) -> socket.socket:
    """A raw socket that asked for ``GET /sse?query`` and read its head and ``ready`` event."""
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    lines = [f"GET /sse?{query} HTTP/1.1", f"Host: 127.0.0.1:{broker.port}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    got = b""
    while b"event: ready" not in got or not got.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200 "), got
    return sock


def gauges(broker: BrokerProcess) -> dict[str, float]:
    """The stream and anonymous connection gauges of ``GET /metrics``."""
    with urllib.request.urlopen(f"{broker.http_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("broker_sse_streams", "broker_anonymous_connections"):
            out[name] = float(value)
    return out


def status_of_a_new_stream(broker: BrokerProcess, query: str) -> int:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        head = f"GET /sse?{query} HTTP/1.1\r\nHost: 127.0.0.1:{broker.port}\r\n\r\n"
        sock.sendall(head.encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


def ended(sock: socket.socket) -> bool:
    """The server closed the stream: EOF (or a reset) after what it had sent."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.fixture
def public_broker(make_broker: Any, tmp_path: Path) -> BrokerProcess:
    path = tmp_path / "public.toml"
    path.write_text(PUBLIC_SCORES)
    broker: BrokerProcess = make_broker(
        "--config", str(path), "--max-anonymous", "1", "--max-connections", "2"
    )
    return broker


def test_a_closed_socket_gives_back_the_gauges_and_the_caps_at_once(
    public_broker: BrokerProcess,
) -> None:
    broker = public_broker
    for _ in range(3):  # the one anonymous slot is free again each time
        sock = open_stream(broker, "topic=scores/%2B")
        assert gauges(broker) == {"broker_sse_streams": 1.0, "broker_anonymous_connections": 1.0}
        assert status_of_a_new_stream(broker, "topic=scores/%2B") == 503  # the cap holds
        sock.close()
        wait_for(
            lambda: (
                gauges(broker) == {"broker_sse_streams": 0.0, "broker_anonymous_connections": 0.0}
            ),
            timeout=GONE_WITHIN,
            interval=0.05,
        )


def test_a_half_close_ends_the_stream(public_broker: BrokerProcess) -> None:
    broker = public_broker
    sock = open_stream(broker, "topic=scores/%2B")
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(GONE_WITHIN)
    assert ended(sock)  # a timeout here raises
    sock.close()
    wait_for(lambda: gauges(broker)["broker_anonymous_connections"] == 0.0, timeout=GONE_WITHIN)


def test_a_half_close_with_the_request_starts_no_stream(public_broker: BrokerProcess) -> None:
    broker = public_broker
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", broker.port), timeout=GONE_WITHIN) as sock:
            sock.sendall(
                f"GET /sse?topic=scores/x HTTP/1.1\r\nHost: x:{broker.port}\r\n\r\n".encode()
            )
            sock.shutdown(socket.SHUT_WR)
            assert ended(sock)
    wait_for(
        lambda: gauges(broker) == {"broker_sse_streams": 0.0, "broker_anonymous_connections": 0.0},
        timeout=GONE_WITHIN,
        interval=0.05,
    )
    assert open_stream(broker, "topic=scores/x")  # the slot is free


def test_bytes_sent_on_a_stream_end_it(broker: BrokerProcess) -> None:
    sock = open_stream(broker, "topic=a", broker.token("reader"))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(GONE_WITHIN)
    assert ended(sock)
    sock.close()
    wait_for(lambda: gauges(broker)["broker_sse_streams"] == 0.0, timeout=GONE_WITHIN)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    app = Backend(tmp_path / "app").start()
    yield app
    app.kill()


def test_the_disconnect_event_follows_a_closed_socket_at_once(
    tmp_path: Path, backend: Backend
) -> None:
    broker = hooked_broker(tmp_path / "broker", backend)
    try:
        sock = open_stream(broker, "topic=room", broker.token("gone"))
        wait_for(lambda: [e["type"] for e in backend.events()] == ["connect"], timeout=10)
        sock.close()
        wait_for(
            lambda: [e["type"] for e in backend.events()] == ["connect", "disconnect"],
            timeout=GONE_WITHIN,
            interval=0.05,
        )
        assert backend.events()[-1]["user"]["id"] == "gone"
    finally:
        broker.kill()


def test_an_anonymous_stream_the_subscribe_hook_refuses_gives_its_slot_back(
    tmp_path: Path, backend: Backend
) -> None:
    home = tmp_path / "broker"
    home.mkdir()
    config = home / "broker.toml"
    config.write_text(
        f'[hooks]\nsubscribe = "{backend.url}/broker/subscribe"\nsecret = "{HOOK_SECRET}"\n'
        '[[namespace]]\npattern = "chat/#"\npublic = true\nsubscribe_hook = true\n'
    )
    broker = BrokerProcess(home, "--config", str(config), "--max-anonymous", "1", memory=True)
    broker.start()
    try:
        for _ in range(3):  # "chat/staff" is for admins: 403, and the one slot is free again
            assert status_of_a_new_stream(broker, "topic=chat/staff") == 403
        sock = open_stream(broker, "topic=chat/lobby")
        assert gauges(broker)["broker_anonymous_connections"] == 1.0
        sock.close()
    finally:
        broker.kill()
