"""Slow consumers against a real broker: a client that stops reading is closed with 4008
once its queue passes the limit, while the others keep pace and the broker's memory
stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from typing import Any, Self

import orjson
import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .support import (
    Peer,
    RawClient,
)


class RssMonitor:
    """Samples a process's RSS in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.process
async def test_slow_consumers_are_closed_and_others_keep_pace(make_broker) -> None:  # type: ignore[no-untyped-def]
    """Ten raw clients that never read; 30 MB published in 30 KB messages, acked."""
    broker = make_broker("--history", "20", memory=True)  # --max-queue: the 1 MiB default
    token = broker.token("slow")
    raws = [RawClient(broker.port, token, rcvbuf=4096) for _ in range(10)]
    for raw in raws:
        assert raw.recv_json()["op"] == "hello"
        raw.send_json({"op": "sub", "id": 1, "topic": "firehose"})
        reply = raw.recv_json()
        assert (reply["op"], reply["id"]) == ("ok", 1), reply
        # From here on these clients never read again.

    admin = await Peer.open(broker.url, broker.token("admin", admin=True))
    sub = await Peer.open(broker.url, broker.token("reader"))
    assert (await sub.request("sub", topic="firehose"))["op"] == "ok"
    pub = await Peer.open(broker.url, broker.token("writer", "Writer"))

    total, batch, pad = 1000, 16, "x" * 30_000  # 1000 x 30 KB = 30 MB
    received: list[dict[str, Any]] = []

    async def consume() -> None:
        while len(received) < total:
            frame = await sub.recv(timeout=30)
            received.append(frame)

    consumer = asyncio.create_task(consume())
    acked: list[int] = []
    started_at = time.monotonic()
    with RssMonitor(broker.proc.pid) as rss:
        for first in range(0, total, batch):
            ids = list(range(first, min(first + batch, total)))
            for i in ids:
                await pub.send(
                    {"op": "pub", "id": i, "topic": "firehose", "data": {"i": i, "pad": pad}}
                )
            for i in ids:
                reply = await pub.recv(timeout=30)
                assert (reply["op"], reply["id"]) == ("ok", i), reply
                acked.append(reply["seq"])
            # The normal subscriber keeps pace: it has everything published so far.
            deadline = time.monotonic() + 30
            while len(received) < len(acked) and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            assert len(received) == len(acked), "the normal subscriber fell behind"
            rss.sample()
        await asyncio.wait_for(consumer, 30)
    elapsed = time.monotonic() - started_at
    print(
        f"30 MB to 1 reader + 10 stuck clients in {elapsed:.1f}s, "
        f"server RSS peak {rss.peak / 2**20:.0f} MB"
    )

    assert [m["op"] for m in received] == ["msg"] * total
    assert [m["data"]["i"] for m in received] == list(range(total))
    assert [m["seq"] for m in received] == acked and acked == sorted(acked)
    assert all(m["from"] == {"id": "writer", "name": "Writer"} for m in received)
    assert rss.peak < 200 * 2**20, f"server RSS peaked at {rss.peak / 2**20:.0f} MB"
    assert elapsed < 60, f"30 MB took {elapsed:.1f}s"

    # The slow clients were closed (4008, then their socket dropped) and are gone.
    stats = await admin.request("stats")
    assert stats["connections"] == 3, stats  # admin, reader, writer
    for raw in raws:
        closed, code = await asyncio.to_thread(raw.drain_until_closed, 10.0)
        assert closed, "a slow consumer was never disconnected"
        assert code in (None, 4008), code
        assert raw.bytes_read < 16 * 2**20, "a slow consumer got most of the stream"
        raw.close()
    # And may reconnect and resume.
    again = await Peer.open(broker.url, token)
    assert (await again.request("sub", topic="firehose", last=1))["op"] == "ok"
    assert (await again.recv())["seq"] == acked[-1]


async def test_slow_consumer_close_code_is_4008(make_broker) -> None:  # type: ignore[no-untyped-def]
    """A websockets client that stops reading sees the 4008 close once it reads again."""
    broker = make_broker("--max-queue", "64KiB", memory=True)
    lazy = await connect(
        broker.url,
        additional_headers={"Authorization": f"Bearer {broker.token('lazy')}"},
        max_queue=1,  # stop reading from the socket after one unread frame
        max_size=None,
    )
    lazy.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert orjson.loads(await lazy.recv())["op"] == "hello"
    await lazy.send(json.dumps({"op": "sub", "id": 1, "topic": "t"}))
    assert orjson.loads(await lazy.recv())["op"] == "ok"
    pub = await Peer.open(broker.url, broker.token("p"))
    for i in range(400):  # 400 x 30 KB: far more than kernel buffers plus 64 KiB
        await pub.send({"op": "pub", "topic": "t", "data": "y" * 30_000, "id": i})
        if i % 50 == 49:
            await pub.recv()
    code = None
    deadline = time.monotonic() + 15
    with contextlib.suppress(ConnectionClosed):
        while time.monotonic() < deadline:
            await asyncio.wait_for(lazy.recv(), deadline - time.monotonic())
    code = lazy.close_code
    assert code in (4008, 1006), code  # 4008 when the close frame made it, else the abort
    if code == 4008:
        assert lazy.close_reason == "slow consumer"
