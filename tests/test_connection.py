"""The connection layer (broker/connection.py) against a real broker: keepalive pings,
handshake and auth deadlines, fragmented messages, and in-order handling of frames that
arrive while a request waits on the store."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

from broker.core.auth import mint_token

from .harness import Broker
from .support import Peer, free_port, raw_upgrade


async def read_until_eof(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_silent_peer_is_dropped_and_a_live_one_is_kept(make_broker: Any) -> None:
    broker: Broker = make_broker("--ping-interval", "0.3", memory=True)
    live = await Peer.open_with_header(broker.url, broker.token("live"))
    await live.recv()  # hello
    # The raw peer stops reading after the handshake, so it never answers a ping.
    reader, writer = await raw_upgrade(broker.port, broker.token("silent"))
    started = time.monotonic()
    data = await read_until_eof(reader, timeout=10)
    waited = time.monotonic() - started
    writer.close()
    # It got hello, at least one ping (opcode 0x9), then a 1011 close and EOF.
    assert b"\x89\x00" in data and b"keepalive ping timeout" in data
    assert 0.5 < waited < 5
    # The websockets client answered every ping: still connected and served.
    ok = await live.request("pub", topic="t", data=1)
    assert ok["op"] == "ok"
    assert "no answer to keepalive pings" in broker.log()
    await live.close()


async def test_pings_are_answered(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("p"))
    pong = await peer.ws.ping(b"are you there")
    await asyncio.wait_for(pong, 5)
    await peer.close()


async def test_connection_without_a_request_is_dropped(make_broker: Any) -> None:
    broker: Broker = make_broker("--auth-timeout", "0.5", memory=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    started = time.monotonic()
    assert await read_until_eof(reader, timeout=10) == b""
    assert time.monotonic() - started < 5
    writer.close()
    # The listener is unaffected.
    peer = await Peer.open(broker.url, broker.token("after"))
    await peer.close()


async def test_fragmented_message_is_reassembled(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("f"))
    await peer.ws.send(['{"op":"pub","topic":"frag",', '"data":"\u00e9t\u00e9","id":7}'])
    reply = await peer.recv()
    assert reply["op"] == "ok" and reply["id"] == 7
    await peer.close()


async def test_character_split_across_fragments(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("f"))
    text = orjson.dumps({"op": "pub", "topic": "frag", "data": "caf\u00e9", "id": 8})
    cut = text.index("\u00e9".encode()) + 1  # inside the two bytes of "\u00e9"
    peer.ws.transport.write(
        Frame(Opcode.TEXT, text[:cut], fin=False).serialize(mask=True)
        + Frame(Opcode.CONT, text[cut:]).serialize(mask=True)
    )
    reply = await peer.recv()
    assert reply["op"] == "ok" and reply["id"] == 8
    await peer.close()


async def test_fragments_over_the_size_limit_close_1009(make_broker: Any) -> None:
    broker: Broker = make_broker("--max-message-size", "1000", memory=True)
    async with connect(broker.url, max_size=None) as ws:
        await ws.send(orjson.dumps({"op": "auth", "token": broker.token("big")}).decode())
        await ws.recv()  # hello
        # Each fragment is under the limit; together they are not.
        await ws.send(['{"op":"pub","topic":"t","data":"', "x" * 600, "y" * 600, '"}'])
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1009


async def test_frames_behind_a_waiting_request_are_handled_in_order(
    broker: Broker,
) -> None:
    async with connect(broker.url) as setup:
        await setup.send(orjson.dumps({"op": "auth", "token": broker.token("w")}).decode())
        await setup.recv()
        for i in range(20):
            await setup.send(orjson.dumps({"op": "pub", "topic": "o", "data": i, "id": i}).decode())
        for _ in range(20):
            await setup.recv()
    peer = await Peer.open(broker.url, broker.token("reader"))
    # One write: a sub that reads history (a task), then more frames than the backlog
    # holds before the server stops reading, then an unsub.
    frames: list[dict[str, Any]] = [{"op": "sub", "topic": "o", "last": 20, "id": "sub"}]
    frames += [{"op": "pub", "topic": "o2", "data": i, "id": i} for i in range(150)]
    frames += [{"op": "unsub", "topic": "o", "id": "unsub"}]
    peer.ws.transport.write(
        b"".join(Frame(Opcode.TEXT, orjson.dumps(f)).serialize(mask=True) for f in frames)
    )
    got: list[dict[str, Any]] = []
    while sum(f["op"] == "ok" for f in got) < len(frames):
        got.append(await peer.recv())
    assert got[0]["id"] == "sub"
    # The replay, complete and in order, before anything sent after the sub was answered.
    assert [f["data"] for f in got[1:21]] == list(range(20))
    assert all(f["op"] == "ok" for f in got[21:])
    # Every publish was handled, in the order sent (their seqs grow with their ids).
    acks = sorted((f["id"], f["seq"]) for f in got[21:] if f["id"] != "unsub")
    assert [i for i, _ in acks] == list(range(150))
    seqs = [seq for _, seq in acks]
    assert seqs == sorted(seqs) and len(set(seqs)) == 150
    # The unsub came last: no msg for "o" after it, although nothing else arrived.
    await peer.expect_nothing()
    await peer.close()


def pub_frame(i: int, size: int = 0, **extra: Any) -> bytes:
    body = {"op": "pub", "topic": "parse", "data": {"i": i, "pad": "p" * size}, "id": i, **extra}
    return Frame(Opcode.TEXT, orjson.dumps(body)).serialize(mask=True)


async def acks(peer: Peer, n: int) -> list[int]:
    got: list[int] = []
    while len(got) < n:
        reply = await peer.recv()
        assert reply["op"] == "ok", reply
        got.append(reply["id"])
    return sorted(got)


async def test_frames_cut_at_every_byte(broker: Broker) -> None:
    # Frames with 7-bit, 16-bit and 64-bit lengths, written a few bytes at a time so that
    # headers, masks and payloads arrive cut anywhere.
    peer = await Peer.open(broker.url, broker.token("cut"))
    stream = pub_frame(1) + pub_frame(2, size=300) + pub_frame(3, size=5000)
    transport = peer.ws.transport
    for i in range(0, len(stream), 3):
        transport.write(stream[i : i + 3])
        if i % 30 == 0:
            await asyncio.sleep(0.001)  # let the pieces go out as separate TCP segments
    assert await acks(peer, 3) == [1, 2, 3]
    await peer.close()


async def test_large_frame_with_64_bit_length(make_broker: Any) -> None:
    broker: Broker = make_broker("--max-message-size", "1MiB", memory=True)
    peer = await Peer.open(broker.url, broker.token("big"))
    peer.ws.transport.write(pub_frame(1, size=200_000) + pub_frame(2))
    assert await acks(peer, 2) == [1, 2]
    await peer.close()


async def test_ping_between_data_frames(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("ctl"))
    ping = Frame(Opcode.PING, b"between").serialize(mask=True)
    peer.ws.transport.write(pub_frame(1) + ping + pub_frame(2))
    assert await acks(peer, 2) == [1, 2]
    await peer.close()


async def test_data_then_close_in_one_write(broker: Broker) -> None:
    reader, writer = await raw_upgrade(broker.port, broker.token("bye"))
    close = Frame(Opcode.CLOSE, (1000).to_bytes(2, "big") + b"bye").serialize(mask=True)
    writer.write(pub_frame(1) + close)
    data = await read_until_eof(reader, timeout=5)
    writer.close()
    # The close is echoed (the pub's ok, due after the commit, finds the connection
    # closing and is not sent) ...
    assert data.endswith(b"\x88\x05\x03\xe8bye")
    # ... and the publish that came before it was handled and recorded.
    peer = await Peer.open(broker.url, broker.token("check"))
    assert (await peer.request("sub", topic="parse", since=0))["recovered"] is True
    assert (await peer.recv())["data"] == {"i": 1, "pad": ""}
    await peer.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        # Text that is not UTF-8.
        (Frame(Opcode.TEXT, b'{"op":"pub","data":"\xff"}').serialize(mask=True), 1007),
        # A client frame without a mask.
        (Frame(Opcode.TEXT, b'{"op":"stats","id":1}').serialize(mask=False), 1002),
        # RSV1 without permessage-deflate negotiated; a reserved opcode.
        (b"\xc1" + Frame(Opcode.TEXT, b"{}").serialize(mask=True)[1:], 1002),
        (b"\x83" + Frame(Opcode.TEXT, b"{}").serialize(mask=True)[1:], 1002),
        # A continuation frame with no message to continue.
        (Frame(Opcode.CONT, b"{}").serialize(mask=True), 1002),
        # A close frame with a code no peer may send; with a reason that is not UTF-8.
        (b"\x88" + Frame(Opcode.TEXT, b"\x03\xed").serialize(mask=True)[1:], 1002),
        (b"\x88" + Frame(Opcode.TEXT, b"\x03\xe8\xff").serialize(mask=True)[1:], 1007),
        # A ping over 125 bytes.
        (b"\x89" + Frame(Opcode.TEXT, b"p" * 126).serialize(mask=True)[1:], 1002),
    ],
    # Stable names: the masks are random, and parallel workers must collect the same tests.
    ids=[
        "text-not-utf8",
        "unmasked",
        "rsv1-without-deflate",
        "reserved-opcode",
        "lone-continuation",
        "close-code-1005",
        "close-reason-not-utf8",
        "ping-over-125",
    ],
)
async def test_bad_frames_close_with_their_code(broker: Broker, frame: bytes, code: int) -> None:
    reader, writer = await raw_upgrade(broker.port, broker.token("bad"))
    writer.write(frame)
    data = await read_until_eof(reader, timeout=5)
    writer.close()
    assert b"\x88" in data and code.to_bytes(2, "big") in data.split(b"\x88", 1)[1][:4]


async def test_compression_not_negotiated_by_default(broker: Broker) -> None:
    """No permessage-deflate unless the server is started with compression (docs/protocol.md):
    nothing to inflate, so no decompression bombs."""
    ws = await connect(
        broker.url,
        compression="deflate",
        additional_headers={"Authorization": f"Bearer {broker.token('1')}"},
    )
    assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
    assert orjson.loads(await ws.recv())["op"] == "hello"
    await ws.close()


async def test_compressed_messages_are_inflated_within_the_size_limit() -> None:
    # permessage-deflate is negotiated only when the server is configured with compression
    # (not a setting), so this broker runs in the test's loop.
    from broker.server.config import ServerConfig
    from broker.server.factory import create_server

    secret = "k" * 32
    port = free_port()
    server = create_server(
        ServerConfig(port=port, secret=secret, memory=True, compression=True, max_message_size=4096)
    )
    await server.start()
    try:
        headers = {"Authorization": f"Bearer {mint_token(secret, 'z', ttl=60)}"}
        url = f"ws://127.0.0.1:{port}/ws"
        async with connect(url, additional_headers=headers, compression="deflate") as ws:
            assert ws.protocol.extensions, "permessage-deflate was not negotiated"
            assert orjson.loads(await ws.recv())["op"] == "hello"
            for i in range(3):  # the client keeps its compression context across messages
                pub = {"op": "pub", "topic": "z", "data": "a" * 3000, "id": i}
                await ws.send(orjson.dumps(pub).decode())
                assert orjson.loads(await ws.recv()) == {"op": "ok", "id": i, "seq": i + 1}
            # Small on the wire, over the limit once inflated.
            await ws.send(orjson.dumps({"op": "pub", "topic": "z", "data": "a" * 5000}).decode())
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1009
    finally:
        await server.shutdown()


async def test_frames_in_the_same_write_as_the_handshake_are_read(broker: Broker) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    auth = {"op": "auth", "token": broker.token("eager")}
    writer.write(request + Frame(Opcode.TEXT, orjson.dumps(auth)).serialize(mask=True))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    first = await asyncio.wait_for(reader.read(2 + 125), 5)
    assert first[0] == 0x81 and b'"op":"hello"' in first, first
    writer.close()
