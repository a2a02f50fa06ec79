"""Delivery, order and history (docs/protocol.md) against real brokers: seq, history,
replay/live without gap or duplicate, durability across kill -9, graceful shutdown, memory
mode."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from .harness import Broker
from .support import BrokerProcess, Peer, async_wait_for


async def publish_many(peer: Peer, items: list[tuple[str, Any]]) -> list[int]:
    """Publish pipelined with ids; return the acknowledged seqs in order."""
    base = 100_000
    for i, (topic, data) in enumerate(items):
        await peer.send({"op": "pub", "topic": topic, "data": data, "id": base + i})
    seqs: dict[int, int] = {}
    while len(seqs) < len(items):
        frame = await peer.recv(timeout=10)
        if frame["op"] == "ok":
            seqs[frame["id"] - base] = frame["seq"]
        else:
            assert frame["op"] == "msg", frame
    return [seqs[i] for i in range(len(items))]


async def collect(peer: Peer, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    return [await peer.recv(timeout) for _ in range(n)]


async def test_seq_increases_across_topics(broker: Broker) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    seqs = await publish_many(pub, [(f"t{i % 7}/x", i) for i in range(60)])
    assert seqs == sorted(seqs) and len(set(seqs)) == 60
    assert seqs == list(range(seqs[0], seqs[0] + 60))
    sub = await Peer.open(broker.url, broker.token("s"))
    await sub.request("sub", topic="#")
    more = await publish_many(pub, [(f"t{i % 3}", i) for i in range(30)])
    got = [m["seq"] for m in await collect(sub, 30)]
    assert got == more and all(a < b for a, b in zip(got, got[1:]))


async def test_last_and_since_exact_and_pattern(broker: Broker) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    items = [("scores/uk", i) if i % 2 else ("scores/fr", i) for i in range(10)] + [("news", "n")]
    seqs = await publish_many(pub, items)
    sub = await Peer.open(broker.url, broker.token("s"))

    ok = await sub.request("sub", topic="scores/uk", last=3)
    assert ok["recovered"] is True and ok["seq"] == seqs[-1] and ok["epoch"]
    assert [m["data"] for m in await collect(sub, 3)] == [5, 7, 9]

    sub2 = await Peer.open(broker.url, broker.token("s"))
    await sub2.request("sub", topic="scores/+", last=4)
    assert [m["data"] for m in await collect(sub2, 4)] == [6, 7, 8, 9]

    sub3 = await Peer.open(broker.url, broker.token("s"))
    ok3 = await sub3.request("sub", topic="scores/#", since=seqs[6], epoch=ok["epoch"])
    assert ok3["recovered"] is True
    assert [m["seq"] for m in await collect(sub3, 3)] == seqs[7:10]
    await sub3.expect_nothing()

    sub4 = await Peer.open(broker.url, broker.token("s"))
    await sub4.request("sub", topic="news", since=0)
    assert (await sub4.recv())["data"] == "n"
    await sub4.expect_nothing()

    # last larger than history: everything retained, in order
    sub5 = await Peer.open(broker.url, broker.token("s"))
    await sub5.request("sub", topic="#", last=1000)
    assert [m["seq"] for m in await collect(sub5, 11)] == seqs


async def test_since_with_other_epoch_or_future_seq_replays_all(broker: Broker) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    seqs = await publish_many(pub, [("t", i) for i in range(3)])
    sub = await Peer.open(broker.url, broker.token("s"))
    ok = await sub.request("sub", topic="t", since=seqs[1], epoch="not-this-one")
    assert ok["recovered"] is False
    assert [m["seq"] for m in await collect(sub, 3)] == seqs
    sub2 = await Peer.open(broker.url, broker.token("s"))
    ok2 = await sub2.request("sub", topic="t", since=seqs[-1] + 50)
    assert ok2["recovered"] is False
    assert [m["seq"] for m in await collect(sub2, 3)] == seqs


async def test_replay_skips_messages_already_delivered(broker: Broker) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    sub = await Peer.open(broker.url, broker.token("s"))
    await sub.request("sub", topic="a/b")
    seqs = await publish_many(pub, [("a/b", 1), ("a/c", 2)])
    assert [m["seq"] for m in await collect(sub, 1)] == seqs[:1]
    await sub.request("sub", topic="a/+", since=0)
    # a/b's message came live already; only a/c's is replayed.
    assert [m["seq"] for m in await collect(sub, 1)] == seqs[1:]
    await sub.expect_nothing()


async def test_recovered_false_when_history_trimmed(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker("--history", "5")
    pub = await Peer.open(broker.url, broker.token("p"))
    seqs = await publish_many(pub, [("t", i) for i in range(12)] + [("u", "x")])
    sub = await Peer.open(broker.url, broker.token("s"))
    ok = await sub.request("sub", topic="t", since=seqs[2])
    assert ok["recovered"] is False
    assert [m["data"] for m in await collect(sub, 5)] == [7, 8, 9, 10, 11]
    sub2 = await Peer.open(broker.url, broker.token("s"))
    ok2 = await sub2.request("sub", topic="t", since=seqs[7])  # still all retained
    assert ok2["recovered"] is True
    assert [m["data"] for m in await collect(sub2, 4)] == [8, 9, 10, 11]
    sub3 = await Peer.open(broker.url, broker.token("s"))
    assert (await sub3.request("sub", topic="u", since=0))["recovered"] is True


@pytest.mark.slow
async def test_retention_age(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker("--retention", "1s")
    pub = await Peer.open(broker.url, broker.token("p"))
    await publish_many(pub, [("t", 1)])
    # The broker's periodic trim runs on its own clock (every 0.5 s for a 1 s retention;
    # trim(now) itself is tested with an injected clock in test_store.py): poll until it
    # has removed the message.
    probe = await Peer.open(broker.url, broker.token("probe"))
    deadline = asyncio.get_running_loop().time() + 5
    while (await probe.request("sub", topic="t", since=0))["recovered"] is not False:
        assert asyncio.get_running_loop().time() < deadline, "message 1 was never trimmed"
        await probe.request("unsub", topic="t")
        await asyncio.sleep(0.1)
    await probe.close()
    seqs = await publish_many(pub, [("t", 2)])
    sub = await Peer.open(broker.url, broker.token("s"))
    ok = await sub.request("sub", topic="t", since=0)
    assert ok["recovered"] is False
    assert [m["seq"] for m in await collect(sub, 1)] == seqs
    await sub.expect_nothing()


@pytest.mark.slow
async def test_subscribe_during_publishing_has_no_gap_or_duplicate(broker: Broker) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    first = await publish_many(pub, [("live/a", i) for i in range(50)])
    since = first[24]
    total = 600
    stop = asyncio.Event()
    acked: list[int] = []

    async def publisher() -> None:
        p = await Peer.open(broker.url, broker.token("p2"))
        for chunk in range(0, total, 20):
            acked.extend(
                await publish_many(
                    p, [(f"live/{'ab'[i % 2]}", i) for i in range(chunk, chunk + 20)]
                )
            )
        stop.set()

    task = asyncio.create_task(publisher())
    await async_wait_for(lambda: len(acked) > 0, 10)  # subscribe while publishes go on
    sub = await Peer.open(broker.url, broker.token("s"))
    ok = await sub.request("sub", topic="live/+", since=since)
    assert ok["recovered"] is True
    await task
    expected = [s for s in first if s > since] + acked
    got: list[int] = []
    while len(got) < len(expected):
        frame = await sub.recv(timeout=10)
        assert frame["op"] == "msg"
        got.append(frame["seq"])
    assert got == sorted(expected)  # every seq after S exactly once, in order
    await sub.expect_nothing()


@pytest.mark.slow
@pytest.mark.process
async def test_kill_9_loses_nothing_acknowledged(broker: BrokerProcess) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    items = [(f"crash/{i % 4}", {"n": i}) for i in range(300)]
    seqs = await publish_many(pub, items)
    epoch = (await pub.request("sub", topic="nothing"))["epoch"]
    broker.kill()
    await asyncio.to_thread(broker.start)
    sub = await Peer.open(broker.url, broker.token("s"))
    ok = await sub.request("sub", topic="crash/#", since=0, epoch=epoch)
    assert ok["epoch"] == epoch and ok["recovered"] is True and ok["seq"] == seqs[-1]
    got = await collect(sub, 300)
    assert [(m["seq"], m["data"]["n"]) for m in got] == list(zip(seqs, range(300)))
    # The seq counter continues after the restart.
    more = await publish_many(sub, [("crash/0", "after")])
    assert more[0] > seqs[-1]


@pytest.mark.slow
async def test_graceful_shutdown_closes_1001_and_keeps_acked(broker: Broker) -> None:
    sub = await Peer.open(broker.url, broker.token("s"))
    await sub.request("sub", topic="g")
    pub = await Peer.open(broker.url, broker.token("p"))
    for i in range(200):
        await pub.send({"op": "pub", "topic": "g", "data": i, "id": i})
    rc = await asyncio.to_thread(broker.stop)
    assert rc == 0
    acked: list[int] = []
    refused = 0
    with pytest.raises(ConnectionClosed):
        while True:
            frame = await pub.recv()
            if frame["op"] == "ok":
                acked.append(frame["seq"])
            elif frame["op"] == "error":
                assert frame["code"] == "unavailable"
                refused += 1
    assert pub.ws.close_code == 1001
    assert acked and len(acked) + refused <= 200
    await asyncio.to_thread(broker.start)
    check = await Peer.open(broker.url, broker.token("c"))
    await check.request("sub", topic="g", since=0)
    stored = [m["seq"] for m in await collect(check, len(acked))] if acked else []
    assert stored[: len(acked)] == acked


async def test_memory_mode_new_epoch_on_restart(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker(memory=True)
    pub = await Peer.open(broker.url, broker.token("p"))
    seqs = await publish_many(pub, [("m", i) for i in range(5)])
    sub = await Peer.open(broker.url, broker.token("s"))
    ok = await sub.request("sub", topic="m", last=2)
    assert [m["seq"] for m in await collect(sub, 2)] == seqs[3:]
    await asyncio.to_thread(broker.restart)
    again = await Peer.open(broker.url, broker.token("s"))
    ok2 = await again.request("sub", topic="m", since=seqs[-1], epoch=ok["epoch"])
    assert ok2["epoch"] != ok["epoch"] and ok2["recovered"] is False
    await again.expect_nothing()


async def test_disk_mode_keeps_epoch_and_seq(broker: Broker) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    seqs = await publish_many(pub, [("d", 1)])
    ok = await pub.request("sub", topic="d")
    await asyncio.to_thread(broker.restart)
    pub2 = await Peer.open(broker.url, broker.token("p"))
    ok2 = await pub2.request("sub", topic="d", since=seqs[0], epoch=ok["epoch"])
    assert ok2["epoch"] == ok["epoch"] and ok2["recovered"] is True and ok2["seq"] == seqs[0]
    assert (await publish_many(pub2, [("d", 2)]))[0] == seqs[0] + 1


@pytest.mark.slow
@pytest.mark.parametrize("limit", ["256KiB", "32KiB"])
async def test_replay_larger_than_the_slow_consumer_limit(make_broker, limit: str) -> None:  # type: ignore[no-untyped-def]
    # 300 x 10 KB = 3 MB of history through a small outgoing limit: the replay must
    # stream with backpressure instead of tripping the slow-consumer close, also when
    # the limit is below the replay's usual 64 KiB chunk.
    broker = make_broker("--max-queue", limit)
    pub = await Peer.open(broker.url, broker.token("p"))
    seqs = await publish_many(pub, [("big", "x" * 10_000) for _ in range(300)])
    sub = await Peer.open(broker.url, broker.token("s"))
    ok = await sub.request("sub", topic="big", since=0)
    assert ok["recovered"] is True
    assert [m["seq"] for m in await collect(sub, 300)] == seqs
    more = await publish_many(pub, [("big", "live")])
    assert (await sub.recv())["seq"] == more[0]
