"""Memory bounded whatever one client does, against real brokers: a publisher faster
than the store stops being read rather than buffered; ``--memory`` history bounded in
bytes across topics; a replay streamed from the store in pages, so readers that never
read cost a page each, not the whole history.

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
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from broker.core.model import Draft, Message, now_ms
from broker.store.base import Pages, Store
from broker.store.memory import MemoryStore
from broker.store.sqlite import SqliteStore

from .harness import Broker
from .support import BrokerProcess, Peer


class RawClient:
    """A WebSocket client over a plain socket that reads only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, broker: Broker, user: str, rcvbuf: int | None = None) -> RawClient:
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


def rss(broker: Broker) -> int:
    assert broker.proc is not None
    return int(psutil.Process(broker.proc.pid).memory_info().rss)


@contextlib.asynccontextmanager
async def flooding(
    broker: Broker, clients: int = 1, size: int = 60_000
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


@pytest.mark.process
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


@pytest.mark.process
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


@pytest.mark.slow
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


async def publish_window(peer: Peer, items: list[tuple[str, Any]], window: int = 20) -> list[int]:
    """Publish with ids, ``window`` unacknowledged at most; return the seqs in order."""
    seqs: dict[int, int] = {}
    sent = 0
    while len(seqs) < len(items):
        while sent < len(items) and sent - len(seqs) < window:
            topic, data = items[sent]
            await peer.send({"op": "pub", "id": sent, "topic": topic, "data": data})
            sent += 1
        frame = await peer.recv(timeout=20)
        assert frame["op"] == "ok", frame
        seqs[frame["id"]] = frame["seq"]
    return [seqs[i] for i in range(len(items))]


@pytest.mark.process
async def test_readers_that_never_read_cost_a_page_not_the_history(broker: BrokerProcess) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    blob = "z" * 60_000
    await publish_window(pub, [(f"big/{i % 4}", [i, blob]) for i in range(1000)])  # 60 MB
    base = rss(broker)
    readers = [await RawClient.open(broker, f"r{i}", rcvbuf=4096) for i in range(4)]
    for reader in readers:
        reader.writer.write(RawClient.frame({"op": "sub", "id": 1, "topic": "#", "since": 0}))
    peak = base
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        peak = max(peak, rss(broker))
        await asyncio.sleep(0.1)
    # Before: each reader loaded the whole 60 MB replay (+240 MB for four).
    assert peak - base < 60 << 20, f"RSS grew by {(peak - base) >> 20} MB"
    # Live messages held back during those replays are bounded too: past max_queue
    # (1 MiB) each reader is closed as a slow consumer.
    await publish_window(pub, [("big/0", [i, blob]) for i in range(30)])
    deadline = time.monotonic() + 10
    while broker.log().count("slow consumer (4008)") < 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert broker.log().count("slow consumer (4008)") >= 4, broker.log()[-2000:]
    assert rss(broker) - base < 60 << 20
    for reader in readers:
        reader.close()
    # A reader that reads gets all of it, in order, page after page, then live messages.
    sub = await Peer.open(broker.url, broker.token("s"))
    ok = await sub.request("sub", topic="big/#", since=0)
    assert ok["recovered"] is True
    got = [(await sub.recv(timeout=10))["seq"] for _ in range(1030)]
    assert got == list(range(got[0], got[0] + 1030))
    live = await publish_window(pub, [("big/0", "live")])
    assert (await sub.recv())["seq"] == live[0]


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    made: Store = (
        MemoryStore(history=50) if request.param == "memory" else SqliteStore(tmp_path / "db", 50)
    )
    await made.open()
    yield made
    await made.close()


async def read_all(pages: Pages) -> list[int]:
    seqs: list[int] = []
    for _ in range(100_000):
        page = await pages.next()
        if not page:
            return seqs
        seqs += [m.seq for m in page]
    raise AssertionError("a replay that never ends")


def drafts(topics: list[str], data: bytes = b"1") -> list[Draft]:
    return [Draft(t, data, "u", "u", now_ms()) for t in topics]


@pytest.mark.slow
async def test_pages_hold_what_whole_reads_hold(store: Store) -> None:
    # 1,200 topics (a pattern over them pages through seq order) and 7 busy ones.
    for i in range(0, 3000, 100):
        await store.append(drafts([f"a/t{j % 1200}" for j in range(i, i + 100)]))
    await store.append(drafts([f"a/t{j % 7}" for j in range(500)]))
    upto = store.last_seq - 2
    for pattern in ("#", "a/+", "a/t3", "a/t1", "nothing/here"):
        for since in (0, 100, 3100, upto):
            whole = await store.read_since(pattern, since, upto)
            pages = await store.replay(pattern, since=since, upto=upto, page_size=37)
            assert await read_all(pages) == [m.seq for m in whole.messages], (pattern, since)
            assert pages.recovered == whole.recovered and not pages.gap
        for n in (1, 10, 1000, 10**6):
            last: list[Message] = await store.read_last(pattern, n, upto)
            pages = await store.replay(pattern, last=n, upto=upto, page_size=50, page_bytes=3)
            assert await read_all(pages) == [m.seq for m in last], (pattern, n)
            assert pages.start == (last[0].seq - 1 if last else upto)


async def test_a_replay_stops_before_a_message_removed_under_it(store: Store) -> None:
    await store.append(drafts(["t"] * 50))
    pages = await store.replay("t", since=0, upto=store.last_seq, page_size=10)
    assert pages.recovered is True
    first = await pages.next()
    assert [m.seq for m in first] == list(range(1, 11))
    await store.append(drafts(["t"] * 20))  # the per-topic bound (50) drops seqs 1-20
    # A read makes every store apply the bound now (SQLite applies its commit log to the
    # database, and the bound with it, before any read).
    await store.read_last("t", 1, store.last_seq)
    assert await pages.next() == [] and pages.gap
    # Resuming after what was sent now tells the client of the loss.
    again = await store.replay("t", since=first[-1].seq, upto=store.last_seq)
    assert again.recovered is False
