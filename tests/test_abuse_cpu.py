"""One client must not freeze the event loop for everyone (issue 13, rows 1 and 2).

The work of a publish is bounded by the connections it reaches, whatever one connection
holds (``TopicIndex`` node visits, counted), and a replay's de-duplication does not scan a
connection's subscriptions per message. Against real brokers, the check is that another
connection's WebSocket ping keeps being answered while the attack runs: the bound is
generous (a second), the old code stalled the loop for several.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from broker.core.auth import Identity
from broker.core.hub import Hub, Subscription
from broker.core.topics import TopicIndex, matches

from .support import BrokerProcess, Peer

BrokerFactory = Callable[..., BrokerProcess]


def overlapping_patterns(depth: int) -> list[str]:
    """Every pattern of ``depth`` levels, each level ``a`` or ``+``: 2**depth of them,
    all matching ``a/a/.../a``."""
    return [
        "/".join("+" if bits >> level & 1 else "a" for level in range(depth))
        for bits in range(2**depth)
    ]


# -- the index, in process --------------------------------------------------------------


def test_overlapping_patterns_of_one_subscriber_cost_one_path() -> None:
    index: TopicIndex[str] = TopicIndex()
    for pattern in overlapping_patterns(14):
        index.add(pattern, "attacker")
    index.add("a/#", "victim")
    topic = "/".join(["a"] * 14)
    index.visits = 0
    assert index.match(topic) == {"attacker", "victim"}
    # A walk of every matching pattern would enter 2**15 nodes.
    assert index.visits <= 4 * 15, index.visits
    index.visits = 0
    assert index.match("a/b") == {"victim"}
    assert index.visits <= 8, index.visits


def test_visits_grow_with_subscribers_found_not_patterns_held() -> None:
    index: TopicIndex[int] = TopicIndex()
    for sub in range(50):
        for pattern in overlapping_patterns(8):
            index.add(pattern, sub)
    index.visits = 0
    assert index.match("a/a/a/a/a/a/a/a") == set(range(50))
    assert index.visits <= 2 * 9 + 9, index.visits  # the paths down, not 50 * 2**9


def test_pattern_count_is_kept_up_to_date() -> None:
    index: TopicIndex[int] = TopicIndex()
    for sub in (1, 2):
        for pattern in ("a", "a/+", "a/#", "b"):
            index.add(pattern, sub)
    assert index.pattern_count == 4 and len(index) == 8
    index.remove("a/#", 1)
    assert index.pattern_count == 4
    index.remove("a/#", 2)
    index.remove("a/#", 2)  # absent: no-op
    assert index.pattern_count == 3 and len(index) == 6
    assert index.pattern_count == len(list(index.patterns()))


def test_matching_patterns_walks_one_subscribers_paths() -> None:
    index: TopicIndex[int] = TopicIndex()
    mine = ["a/+", "a/#", "+/b", "#", "a/b", "x/y"]
    for pattern in mine:
        index.add(pattern, 1)
    for n in range(1000):
        index.add(f"a/{n}", 2)  # someone else's, under the same node
    found = index.matching_patterns("a/b", 1)
    assert sorted(found) == sorted(p for p in mine if matches(p, "a/b"))
    index.visits = 0
    index.matching_patterns("a/7", 1)
    assert index.visits <= 8, index.visits
    assert index.matching_patterns("$sys/b", 1) == []  # wildcards never match '$' topics


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


# -- the hub, in process: close in slices, de-duplication by lookup --------------------------


class Conn:
    """A connection as the hub sees it; what it is sent does not matter here."""

    def __init__(self, cid: int, user: str) -> None:
        self.id = cid
        self.identity = Identity(id=user, name=user)

    def deliver(self, message: object) -> None:
        pass

    def deliver_run(self, run: object) -> None:
        pass

    def send(self, frame: bytes) -> None:
        pass


def test_detach_in_slices_leaves_others_and_announces_every_leave() -> None:
    leaves: list[str] = []
    hub = Hub(on_presence=lambda op, topic, user: leaves.append(topic) if op == "leave" else None)
    big, other = Conn(1, "big"), Conn(2, "other")
    for n in range(5000):
        hub.subscribe(big, Subscription(f"t/{n}"))
    hub.subscribe(other, Subscription("t/1"))
    rounds = 0
    while not hub.detach(big, 2000):
        rounds += 1
        assert len(hub.index) == 5001 - 2000 * rounds  # a slice at a time
    assert rounds == 2 and len(hub.index) == 1
    assert sorted(leaves) == sorted(f"t/{n}" for n in range(5000))
    assert hub.index.match("t/1") == {other} and big not in hub.subscriptions
    assert hub.index.pattern_count == 1


def test_replay_filter_looks_up_a_topic_once() -> None:
    hub = Hub()
    conn = Conn(1, "u")
    for n in range(1000):
        hub.subscribe(conn, Subscription(f"t/{n}", covered_from=100))
    hub.subscribe(conn, Subscription("a/+", covered_from=50))
    hub.subscribe(conn, Subscription("a/#", covered_from=0))
    covered = hub.replay_filter(conn, besides="a/#")
    hub.index.visits = 0
    assert [covered("a/x", seq) for seq in (10, 50, 51, 500)] == [False, False, True, True]
    first = hub.index.visits
    assert first <= 8, first  # the connection's own paths, not its 1,002 subscriptions
    assert not covered("b/x", 10**6)
    for seq in range(1000):
        covered("a/x", seq)
    assert hub.index.visits <= first + 8  # a/x was looked up once
