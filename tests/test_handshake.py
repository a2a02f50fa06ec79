"""The WebSocket opening handshake (broker/server/handshake.py and its use by the
connection): the 101 the fast path writes, and the refusals it leaves to websockets,
answered exactly as websockets answers them, against a broker in the test's loop."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator

import orjson
import pytest
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol
from websockets.utils import accept_key as websockets_accept_key

from broker.core.auth import mint_token
from broker.server.app import BrokerServer
from broker.server.config import ServerConfig
from broker.server.factory import create_server
from broker.server.handshake import accept_key, parse_upgrade, upgrade_ok

from .support import free_port

SECRET = "h" * 32


def head(*lines: str, target: str = "/ws") -> bytes:
    """A request head with ``lines`` as its headers."""
    return "\r\n".join([f"GET {target} HTTP/1.1", *lines, "", ""]).encode()


def key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def good(k: str, *extra: str) -> list[str]:
    return [
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {k}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]


async def exchange(port: int, data: bytes, *more: bytes, then: bool = True) -> tuple[bytes, bytes]:
    """Send ``data`` (then each of ``more`` as a separate write); the response head and
    (``then``) the first bytes after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        for chunk in more:
            await writer.drain()
            await asyncio.sleep(0)
            writer.write(chunk)
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        rest = await asyncio.wait_for(reader.read(4096), 5) if then else b""
        return response, rest
    finally:
        writer.close()


def websockets_answer(request: bytes) -> tuple[int, bytes]:
    """What websockets' own handshake answers to ``request``: status and body."""
    protocol = ServerProtocol()
    protocol.receive_data(request)
    [event] = protocol.events_received()
    response = protocol.accept(event)  # type: ignore[arg-type]
    return response.status_code, bytes(response.body or b"")


@pytest.fixture
async def server() -> AsyncIterator[BrokerServer]:
    broker = create_server(ServerConfig(port=free_port(), secret=SECRET, memory=True))
    await broker.start()
    try:
        yield broker
    finally:
        await broker.shutdown()


def test_accept_key_is_rfc_6455s() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


async def test_the_101_is_websockets_own_and_the_connection_works(server: BrokerServer) -> None:
    k = key()
    token = mint_token(SECRET, "fast", ttl=60)
    request = head(*good(k, f"Authorization: Bearer {token}"))
    response, rest = await exchange(server.config.port, request)
    lines = response.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 101 Switching Protocols"
    names = [line.split(":", 1)[0] for line in lines[1:-2]]
    assert names == ["Date", "Upgrade", "Connection", "Sec-WebSocket-Accept", "Server"]
    assert f"Sec-WebSocket-Accept: {websockets_accept_key(k)}" in lines
    assert "Upgrade: websocket" in lines and "Connection: Upgrade" in lines
    assert rest[0] == 0x81 and b'"op":"hello"' in rest and b'"id":"fast"' in rest


async def test_a_head_in_two_writes_is_accepted(server: BrokerServer) -> None:
    request = head(*good(key()))
    response, _ = await exchange(server.config.port, request[:20], request[20:], then=False)
    assert response.startswith(b"HTTP/1.1 101 ")


async def test_frames_after_the_head_in_the_same_write_are_read(server: BrokerServer) -> None:
    auth = {"op": "auth", "token": mint_token(SECRET, "eager", ttl=60)}
    frame = Frame(Opcode.TEXT, orjson.dumps(auth)).serialize(mask=True)
    response, rest = await exchange(server.config.port, head(*good(key())) + frame)
    assert response.startswith(b"HTTP/1.1 101 ")
    assert rest[0] == 0x81 and b'"id":"eager"' in rest


REFUSED = {
    "bad version": (400, good("K" * 22 + "==", "Sec-WebSocket-Version: 8")[:4] + [
        "Sec-WebSocket-Version: 8"
    ]),
    "no version": (400, good("K" * 22 + "==")[:4]),
    "two versions": (400, good("K" * 22 + "==", "Sec-WebSocket-Version: 13")),
    "short key": (400, ["Host: x", "Upgrade: websocket", "Connection: Upgrade",
                        "Sec-WebSocket-Key: c2hvcnQ=", "Sec-WebSocket-Version: 13"]),
    "key not base64": (400, ["Host: x", "Upgrade: websocket", "Connection: Upgrade",
                             "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==",
                             "Sec-WebSocket-Version: 13"]),
    "no key": (400, ["Host: x", "Upgrade: websocket", "Connection: Upgrade",
                     "Sec-WebSocket-Version: 13"]),
    "no upgrade header": (426, ["Host: x", "Connection: Upgrade",
                                "Sec-WebSocket-Key: " + "K" * 22 + "==",
                                "Sec-WebSocket-Version: 13"]),
    "upgrade to another protocol": (426, ["Host: x", "Upgrade: h2c", "Connection: Upgrade",
                                          "Sec-WebSocket-Key: " + "K" * 22 + "==",
                                          "Sec-WebSocket-Version: 13"]),
    "connection keep-alive": (426, ["Host: x", "Upgrade: websocket",
                                    "Connection: keep-alive",
                                    "Sec-WebSocket-Key: " + "K" * 22 + "==",
                                    "Sec-WebSocket-Version: 13"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_a_bad_handshake_gets_websockets_answer(server: BrokerServer, case: str) -> None:
    status, lines = REFUSED[case]
    request = head(*lines)
    assert upgrade_ok(parse_upgrade(request).headers) is None  # type: ignore[union-attr]
    expected = websockets_answer(request)
    assert expected[0] == status
    response, body = await exchange(server.config.port, request)
    assert response.startswith(f"HTTP/1.1 {status} ".encode()), response
    assert body == expected[1]


@pytest.mark.parametrize(
    "request_head",
    [
        head("Host: x", "Upgrade: websocket").replace(b"\r\n", b"\n"),  # bare LF
        head("Host: x", " folded", "Upgrade: websocket"),  # obs-fold
        head("Host: x", "Host: y", "Upgrade: websocket"),  # two Hosts
        head("Upgrade: websocket"),  # no Host
        head("Host: x", "Content-Length: 0"),  # a body, even empty: h11 and websockets decide
        head("Host: x", "Sec-WebSocket-Protocol: chat"),  # a subprotocol to negotiate
        head("Host: x", "Bad Name: 1"),
        head("Host: x", "X: caf\u00e9"),  # not ASCII
        head("Host: x", target="/ws2"),
        head("Host: x", target="/other"),
        b"GET /ws HTTP/1.0\r\nHost: x\r\n\r\n",
        b"POST /ws HTTP/1.1\r\nHost: x\r\n\r\n",
        head("Host: x", "X: " + "a" * 17000),  # over h11's bound on a head
    ],
)
def test_anything_unusual_takes_the_general_path(request_head: bytes) -> None:
    assert parse_upgrade(request_head) is None


def test_an_extension_offer_is_negotiated_only_when_compression_is_on() -> None:
    offer = head(*good(key()), "Sec-WebSocket-Extensions: permessage-deflate")
    assert parse_upgrade(offer, extensions=True) is None
    request = parse_upgrade(offer)  # websockets ignores the offer: so does the fast path
    assert request is not None and upgrade_ok(request.headers) is not None


async def test_an_extension_offer_to_a_broker_without_compression_is_ignored(
    server: BrokerServer,
) -> None:
    request = head(*good(key()), "Sec-WebSocket-Extensions: permessage-deflate; x")
    response, _ = await exchange(server.config.port, request, then=False)
    assert response.startswith(b"HTTP/1.1 101 ") and b"Extensions" not in response


def test_a_plain_upgrade_is_parsed_once() -> None:
    k = key()
    request = parse_upgrade(head(*good(k, "Origin: http://a"), target="/ws?x=1"))
    assert request is not None and request.path == "/ws?x=1"
    assert request.headers["Origin"] == "http://a"
    assert upgrade_ok(request.headers) == websockets_accept_key(k)
    # Header names and the Connection list are read as websockets reads them.
    request = parse_upgrade(head(*good(k)[:2], "connection: keep-alive, upgrade", *good(k)[3:]))
    assert request is not None and upgrade_ok(request.headers) == websockets_accept_key(k)


async def test_compression_on_and_not_offered_still_opens() -> None:
    broker = create_server(
        ServerConfig(port=free_port(), secret=SECRET, memory=True, compression=True)
    )
    await broker.start()
    try:
        token = mint_token(SECRET, "plain", ttl=60)
        request = head(*good(key(), f"Authorization: Bearer {token}"))
        response, rest = await exchange(broker.config.port, request)
        assert response.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Extensions" not in response
        assert b'"op":"hello"' in rest
    finally:
        await broker.shutdown()
