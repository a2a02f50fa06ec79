"""Admission against a real broker: the connection cap (``--max-connections``), sockets
counted from accept, the unauthenticated connections' bound, per-address cap and deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .support import (
    Peer,
    refusal,
)


async def test_max_connections(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker("--max-connections", "3", memory=True)
    token = broker.token("1")
    peers = [await Peer.open_with_header(broker.url, token) for _ in range(3)]
    for p in peers:
        assert (await p.recv())["op"] == "hello"
    status, body = await refusal(broker.url, {"Authorization": f"Bearer {token}"})
    assert status == 503 and body.strip()
    status, _ = await refusal(broker.url, {})  # without a token too
    assert status == 503
    await peers[0].close()
    deadline = time.monotonic() + 5
    while True:
        try:
            fresh = await Peer.open_with_header(broker.url, token)
            break
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            assert time.monotonic() < deadline, "a closed connection's slot was never freed"
            await asyncio.sleep(0.05)
    assert (await fresh.recv())["op"] == "hello"
    assert (await fresh.request("sub", topic="x"))["op"] == "ok"
    assert (await peers[1].request("sub", topic="x"))["op"] == "ok"


async def test_max_connections_under_a_burst(make_broker) -> None:  # type: ignore[no-untyped-def]
    """Twenty simultaneous upgrades against a cap of three: three get in."""
    broker = make_broker("--max-connections", "3", memory=True)
    token = broker.token("1")

    async def attempt() -> Any:
        try:
            ws = await connect(
                broker.url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
            )
        except InvalidStatus as exc:
            return exc.response.status_code
        with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError):
            await asyncio.wait_for(ws.recv(), 5)
        return ws

    results = await asyncio.gather(*(attempt() for _ in range(20)))
    opened = [r for r in results if not isinstance(r, int)]
    assert sorted(r for r in results if isinstance(r, int)) == [503] * (20 - len(opened))
    assert len(opened) == 3, f"{len(opened)} connections accepted with --max-connections 3"
    for ws in opened:
        await ws.close()
