"""One client must not freeze the event loop for everyone: against real brokers, another
connection's WebSocket ping keeps being answered while a publish meets many overlapping
patterns or a replay serves a connection holding many subscriptions. The bound is
generous (a second); the code before these bounds stalled the loop for several.

The in-process side of the same bounds (``TopicIndex`` node visits, the hub's detach in
slices and replay filter) is in test_topics.py and test_hub.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import pytest

from .harness import Broker
from .support import Peer, overlapping_patterns

BrokerFactory = Callable[..., Broker]


# -- real brokers ------------------------------------------------------------------------


async def worst_ping(url: str, token: str, attack: Awaitable[None]) -> float:
    """Run ``attack`` while another connection pings the broker; the slowest round trip."""
    peer = await Peer.open(url, token)
    worst = 0.0
    task = asyncio.ensure_future(attack)
    try:
        deadline = time.monotonic() + 60
        while not task.done() and time.monotonic() < deadline:
            started = time.monotonic()
            pong = await peer.ws.ping()
            await asyncio.wait_for(pong, 30)
            worst = max(worst, time.monotonic() - started)
            await asyncio.sleep(0.01)
        await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await peer.close()
    return worst


async def request_all(
    peer: Peer, frames: list[dict[str, object]], others: list[dict[str, object]] | None = None
) -> list[dict[str, object]]:
    """Send every frame (each with an ``id``) at once; the replies, in id order. Other
    frames received meanwhile go to ``others``."""
    for frame in frames:
        await peer.send(frame)
    replies: dict[object, dict[str, object]] = {}
    while len(replies) < len(frames):
        reply = await peer.recv(timeout=30)
        if reply["op"] in ("ok", "error"):
            replies[reply["id"]] = reply
        elif others is not None:
            others.append(reply)
    return [replies[f["id"]] for f in frames]


async def test_publishes_against_overlapping_patterns_keep_the_loop_free(
    make_broker: BrokerFactory,
) -> None:
    """Row 2: one connection holds every a/+ pattern of 12 levels and publishes to
    a/.../a; others are still served at once."""
    broker = make_broker("--max-subscriptions", "5000", memory=True)
    attacker = await Peer.open(broker.url, broker.token("attacker"))
    patterns = overlapping_patterns(12)
    replies = await request_all(
        attacker, [{"op": "sub", "id": n, "topic": p} for n, p in enumerate(patterns)]
    )
    assert all(r["op"] == "ok" for r in replies)
    topic = "/".join(["a"] * 12)
    count = 600
    frames: list[dict[str, object]] = []

    async def attack() -> None:
        acks = await request_all(
            attacker,
            [
                {"op": "pub", "id": 10**6 + n, "topic": topic, "data": n, "echo": True}
                for n in range(count)
            ],
            frames,
        )
        assert all(a["op"] == "ok" for a in acks)

    worst = await worst_ping(broker.url, broker.token("probe"), attack())
    assert worst < 1.0, f"the loop stalled {worst:.2f}s"
    # Each message reached the attacker once, however many of its patterns match.
    seen = [f["data"] for f in frames if f["op"] == "msg"]
    while len(seen) < count:
        frame = await attacker.recv(timeout=10)
        if frame["op"] == "msg":
            seen.append(frame["data"])
    assert seen == list(range(count))
    await attacker.expect_nothing(0.2)


@pytest.mark.slow
async def test_replay_to_a_connection_with_many_subscriptions_keeps_the_loop_free(
    make_broker: BrokerFactory,
) -> None:
    """Row 1: one connection holds 10,000 subscriptions, then replays 1,000 messages."""
    broker = make_broker("--max-subscriptions", "20000", memory=True)
    attacker = await Peer.open(broker.url, broker.token("attacker"))
    acks = await request_all(
        attacker, [{"op": "pub", "id": n, "topic": "h/x", "data": n} for n in range(1000)]
    )
    assert all(a["op"] == "ok" for a in acks)
    subs = await request_all(
        attacker, [{"op": "sub", "id": 10**6 + n, "topic": f"t/{n}"} for n in range(10_000)]
    )
    assert all(s["op"] == "ok" for s in subs)
    # One of them also matches the history, from before it: its replay is not skipped.
    assert (await attacker.request("sub", topic="h/+"))["op"] == "ok"
    replayed: list[object] = []

    async def attack() -> None:
        await attacker.send({"op": "sub", "id": "r", "topic": "h/#", "last": 1000})
        while len(replayed) < 1000:
            frame = await attacker.recv(timeout=30)
            if frame["op"] == "msg":
                replayed.append(frame["data"])

    worst = await worst_ping(broker.url, broker.token("probe"), attack())
    assert worst < 1.0, f"the loop stalled {worst:.2f}s"
    assert replayed == list(range(1000))


async def test_replay_skips_what_another_subscription_delivered(
    make_broker: BrokerFactory,
) -> None:
    """The de-duplication still works: a message delivered live through ``h/+`` is not
    replayed again by a later ``h/#`` with ``last``."""
    broker = make_broker(memory=True)
    peer = await Peer.open(broker.url, broker.token("u"))
    pub = await Peer.open(broker.url, broker.token("p"))
    await pub.request("pub", topic="h/x", data="before")
    assert (await peer.request("sub", topic="h/+"))["op"] == "ok"
    await pub.request("pub", topic="h/x", data="live")
    assert (await peer.recv())["data"] == "live"
    ok = await peer.request("sub", topic="h/#", last=10)
    assert ok["op"] == "ok"
    assert (await peer.recv())["data"] == "before"
    await peer.expect_nothing(0.3)
