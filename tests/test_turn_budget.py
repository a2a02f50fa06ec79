"""The frames that wait in connections' backlogs share one budget per event-loop turn
(``_TURN_BUDGET``), round robin: however many connections flood publishes, a turn, and so
every other client's publish in it, waits for a bounded number of them (32 connections
with a slice each made turns of 1,024 publishes: issue 27, row 11). The publishes still
all land, each connection's in the order sent (in-process broker, real sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from broker.core.frames import encode
from broker.server.app import _TURN_BUDGET, _TURN_SLICE

from .support import Peer, raw_upgrade

#: A client's masking key of zeros: the frames carry the JSON as it is.
ZERO_KEY = bytes(4)

FLOODS = 24
EACH = 400


async def _flood(broker: Any, n: int) -> asyncio.StreamWriter:
    """A raw WebSocket connection, to send EACH publishes in one write."""
    _, writer = await raw_upgrade(broker.port, broker.token(f"flood{n}"), timeout=10)
    return writer


async def test_backlogs_share_one_budget_per_turn(broker: Any) -> None:
    assert broker.server is not None
    batches: list[int] = []
    broker.server.journal.commit_observers.append(lambda size, _: batches.append(size))
    sub = await Peer.open(broker.url, broker.token("reader"))
    assert (await sub.request("sub", topic="budget/#"))["op"] == "ok"
    writers = await asyncio.gather(*(_flood(broker, n) for n in range(FLOODS)))
    frames = [
        b"".join(
            encode(orjson.dumps({"op": "pub", "topic": f"budget/{n}", "data": i}), mask=ZERO_KEY)
            for i in range(EACH)
        )
        for n in range(FLOODS)
    ]
    for writer, data in zip(writers, frames):  # one write each, all before any drains
        writer.write(data)
    await asyncio.gather(*(w.drain() for w in writers))
    got: dict[str, list[int]] = {}
    for _ in range(FLOODS * EACH):
        frame = await sub.recv(timeout=10)
        assert frame.get("op") == "msg", frame
        got.setdefault(frame["topic"], []).append(frame["data"])
    assert got == {f"budget/{n}": list(range(EACH)) for n in range(FLOODS)}
    # Once every connection has a backlog, a turn commits at most the budget (a slice of
    # each connection, as before, would be FLOODS * _TURN_SLICE = 768 a turn for about
    # EACH / _TURN_SLICE turns); only the turns that read the first frames hold more.
    assert FLOODS * _TURN_SLICE > 2 * _TURN_BUDGET
    over = [size for size in batches if size > _TURN_BUDGET + _TURN_SLICE]
    assert len(over) <= 3, batches
    for writer in writers:
        writer.close()
    await sub.close()
