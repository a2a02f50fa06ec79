"""Graceful shutdown of a ``broker serve`` process: SIGTERM/SIGINT drain what was accepted,
close connections with 1001, and exit within ``--drain-timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from .support import (
    Peer,
    RawClient,
    closed_with,
    http_get,
)

pytestmark = pytest.mark.process


async def test_graceful_shutdown(make_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # On-disk store: an ok means durably recorded. History large enough to keep them all.
    broker = make_broker("--drain-timeout", "10", "--history", "100000")
    reader = await Peer.open_with_header(broker.url, broker.token("reader"))
    assert (await reader.recv())["op"] == "hello"
    assert (await reader.request("sub", topic="t"))["op"] == "ok"
    writer = await Peer.open(broker.url, broker.token("writer"))
    pending_auth = await Peer.open(broker.url)  # connected, not yet authenticated
    replies: dict[int, dict[str, Any]] = {}

    async def collect() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await writer.recv(timeout=15)
                replies[frame["id"]] = frame

    async def publish() -> int:
        """Publish without pause until the server closes: some land during the drain."""
        sent = 0
        with contextlib.suppress(ConnectionClosed):
            while sent < 20_000:
                await writer.send({"op": "pub", "topic": "t", "data": sent, "id": sent})
                sent += 1
                if sent % 20 == 0:
                    await asyncio.sleep(0.001)  # let the collector read the replies
        return sent

    collector = asyncio.create_task(collect())
    publisher = asyncio.create_task(publish())
    deadline = time.monotonic() + 10
    while len(replies) < 100:  # publishes are flowing: the drain will land among them
        assert time.monotonic() < deadline, "no replies to the publisher"
        await asyncio.sleep(0.01)
    assert broker.proc is not None
    began = time.monotonic()
    broker.proc.send_signal(signal.SIGTERM)
    sent = await asyncio.wait_for(publisher, 15)
    await asyncio.wait_for(collector, 15)
    assert writer.ws.close_code == 1001
    outcomes = collections.Counter(r.get("code", r["op"]) for r in replies.values())
    assert set(outcomes) <= {"ok", "unavailable"}, outcomes
    assert outcomes["ok"] > 0 and sent < 20_000
    acked = {r["seq"] for r in replies.values() if r["op"] == "ok"}
    code, _, received = await closed_with(reader, timeout=10)
    assert code == 1001
    assert {m["op"] for m in received} <= {"msg"}
    code, _, frames = await closed_with(pending_auth, timeout=10)
    assert code == 1001 and frames == []

    rc = await asyncio.to_thread(broker.proc.wait, 15)
    elapsed = time.monotonic() - began
    assert rc == 0, broker.log()[-3000:]
    assert elapsed < 5, f"exit took {elapsed:.1f}s (drain timeout 10s)"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", broker.port), timeout=1).close()

    # Everything acknowledged was recorded.
    broker.start()
    late = await Peer.open(broker.url, broker.token("late"))
    assert (await late.request("sub", topic="t", since=0))["op"] == "ok"
    replayed: set[int] = set()
    with contextlib.suppress(asyncio.TimeoutError):
        while True:
            replayed.add((await late.recv(timeout=1.0))["seq"])
    assert acked <= replayed, sorted(acked - replayed)[:10]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_shutdown_is_bounded_by_drain_timeout(make_broker, sig: int) -> None:  # type: ignore[no-untyped-def]
    """A client that never reads and never answers the close does not hold the exit up;
    /healthz answers 503 or the port is closed while draining."""
    broker = make_broker("--drain-timeout", "2", memory=True)
    raw = RawClient(broker.port, broker.token("stuck"), rcvbuf=4096)
    assert raw.recv_json()["op"] == "hello"
    raw.send_json({"op": "sub", "id": 1, "topic": "t"})
    assert raw.recv_json()["op"] == "ok"
    pub = await Peer.open(broker.url, broker.token("p"))
    for i in range(20):  # ~600 KB queued towards the stuck client, under the 1 MiB limit
        await pub.send({"op": "pub", "topic": "t", "data": "z" * 30_000, "id": i})
    for _ in range(20):
        assert (await pub.recv())["op"] == "ok"
    assert broker.proc is not None
    began = time.monotonic()
    broker.proc.send_signal(sig)
    code, _, _ = await closed_with(pub, timeout=5)
    assert code == 1001
    health = await asyncio.to_thread(
        lambda: http_get(broker.http_url + "/healthz") if broker.proc.poll() is None else (0, b"")
    )
    assert health[0] != 200 or broker.proc.poll() is not None, health
    rc = await asyncio.to_thread(broker.proc.wait, 10)
    elapsed = time.monotonic() - began
    raw.close()
    assert rc == 0, broker.log()[-3000:]
    assert elapsed < 2 + 1.0, f"exit took {elapsed:.1f}s with --drain-timeout 2"
