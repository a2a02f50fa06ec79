"""Memory bounded whatever one client does (issue 13, rows 3 and 8), against real broker
processes: a publisher faster than the store stops being read rather than buffered;
``--memory`` history bounded in bytes across topics; a replay streamed from the store in
pages, so readers that never read cost a page each, not the whole history.

The broker's RSS is read with psutil; the bounds are generous (several times what the
broker needs), and far below what the same attacks cost before these bounds existed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import psutil

from .support import BrokerProcess, Peer


class RawClient:
    """A WebSocket client over a plain socket that reads only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, broker: BrokerProcess, user: str, rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket()
        if rcvbuf is not None:  # a reader that never reads: keep the kernel's share small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", broker.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{broker.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {broker.token(user)}\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b" 101 " in head.split(b"\r\n", 1)[0], head
        return cls(reader, writer)

    @staticmethod
    def frame(payload: dict[str, Any]) -> bytes:
        """A masked (with a zero key) client text frame."""
        data = orjson.dumps(payload)
        n = len(data)
        if n < 126:
            head = bytes([0x81, 0x80 | n])
        elif n < 65536:
            head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
        return head + b"\0\0\0\0" + data

    async def read_until(self, marker: bytes, timeout: float) -> bool:
        """Read (and drop) until ``marker`` was seen; False if not within ``timeout``."""
        seen = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), deadline - time.monotonic())
            except TimeoutError:
                return False
            if not chunk:
                return False
            seen = seen[-len(marker) :] + chunk
            if marker in seen:
                return True
        return False

    def close(self) -> None:
        self.writer.transport.abort()


def rss(broker: BrokerProcess) -> int:
    assert broker.proc is not None
    return int(psutil.Process(broker.proc.pid).memory_info().rss)


@contextlib.asynccontextmanager
async def flooding(
    broker: BrokerProcess, clients: int = 1, size: int = 60_000
) -> AsyncIterator[list[RawClient]]:
    """``clients`` connections sending fire-and-forget ``size``-byte publishes as fast as
    the broker reads them, until the block ends."""
    floods = [await RawClient.open(broker, f"flood{i}") for i in range(clients)]
    frame = RawClient.frame({"op": "pub", "topic": "flood", "data": "x" * size})
    stop = asyncio.Event()

    async def push(client: RawClient) -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            client.writer.write(frame)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.writer.drain(), 0.2)

    tasks = [asyncio.create_task(push(c)) for c in floods]
    try:
        yield floods
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_fire_and_forget_flood_is_paused_not_buffered(broker: BrokerProcess) -> None:
    other = await Peer.open(broker.url, broker.token("other"))
    base = rss(broker)
    peak = base
    acks: list[float] = []
    async with flooding(broker) as (flood,):
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            started = time.monotonic()
            reply = await other.request("pub", topic="calm", data=len(acks))
            assert reply["op"] == "ok", reply
            acks.append(time.monotonic() - started)
            peak = max(peak, rss(broker))
            assert peak - base < 200 << 20, f"RSS grew by {(peak - base) >> 20} MB"
            await asyncio.sleep(0.2)
    # Another publisher is not stuck behind the flood (it took 7-21 s before).
    assert max(acks) < 2.0, acks
    # The flooder is resumed, not dropped: its next publish is acknowledged.
    flood.writer.write(RawClient.frame({"op": "pub", "id": 7, "topic": "flood", "data": 1}))
    assert await flood.read_until(b'"op":"ok","id":7', timeout=20)
    flood.close()


async def test_the_global_bound_pauses_many_publishers(make_broker: Any) -> None:
    # Per connection: no practical bound; in all: 256 KiB waiting for the store.
    broker = make_broker(
        "--max-pending-bytes", "64MiB", "--max-pending-publishes", "100000",
        "--max-store-backlog", "256KiB",
    )  # fmt: skip
    base = rss(broker)
    peak = base
    async with flooding(broker, clients=4) as floods:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            peak = max(peak, rss(broker))
            assert peak - base < 200 << 20, f"RSS grew by {(peak - base) >> 20} MB"
            await asyncio.sleep(0.1)
    for flood in floods:
        flood.close()
    log = broker.log()
    assert "pausing publishers" in log, log
    deadline = time.monotonic() + 10
    while "resuming publishers" not in broker.log() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert "resuming publishers" in broker.log()
    assert "Traceback" not in broker.log()


async def test_memory_history_is_bounded_in_bytes_oldest_first(make_broker: Any) -> None:
    broker = make_broker("--history-size", "100KiB", memory=True)
    peer = await Peer.open(broker.url, broker.token("p"))
    blob = "y" * 10_000
    seqs = []
    for i in range(30):  # ~300 KB over three topics
        reply = await peer.request("pub", topic=f"t/{i % 3}", data=[i, blob])
        seqs.append(reply["seq"])
    sub = await Peer.open(broker.url, broker.token("s"))
    ok = await sub.request("sub", topic="t/#", since=0)
    assert ok["recovered"] is False
    kept = []
    with contextlib.suppress(TimeoutError):
        while True:
            kept.append(await sub.recv(timeout=1))
    kept_seqs = [m["seq"] for m in kept]
    # The newest messages of every topic stay, the oldest of all go first: a suffix.
    assert 5 <= len(kept_seqs) <= 10, kept_seqs
    assert kept_seqs == seqs[-len(kept_seqs) :]
    # `recovered` is exact at the boundary.
    first_kept = kept_seqs[0]
    again = await Peer.open(broker.url, broker.token("s2"))
    assert (await again.request("sub", topic="t/#", since=first_kept - 1))["recovered"] is True
    other = await Peer.open(broker.url, broker.token("s3"))
    assert (await other.request("sub", topic="t/#", since=first_kept - 2))["recovered"] is False
