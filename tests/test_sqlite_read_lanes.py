"""The SQLite store's reads: a read of one topic does not wait behind pattern reads over
many topics that other clients queued before it, nor for the commit log's messages of
other topics; a pattern read over many topics costs what it reads (issue 27, row 6)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from broker.core.model import Draft
from broker.store.base import Pages
from broker.store.sqlite import SqliteStore

from .harness import BrokerThread
from .support import Peer


async def test_a_one_topic_read_overtakes_queued_pattern_reads(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "broker.sqlite3")
    await store.open()
    try:
        now = int(time.time() * 1000)
        for start in range(0, 20_000, 5000):
            await store.append(
                [Draft(f"t/{i}", b"1", "u", "u", now) for i in range(start, start + 5000)]
            )
        await store.append([Draft("mine", b"2", "me", "me", now)])
        upto = store.last_seq
        # Eight clients' `sub` of '#' with last: 5, queued first.
        wide = [asyncio.create_task(store.read_last("#", 5, upto)) for _ in range(8)]
        await asyncio.sleep(0)
        mine = await store.read_last("mine", 5, upto)
        assert [m.payload for m in mine] == [b"2"]
        # The pattern reads were still being served when the one-topic read was answered.
        assert not all(task.done() for task in wide)
        newest = ["t/19996", "t/19997", "t/19998", "t/19999", "mine"]
        for got in await asyncio.gather(*wide):
            assert [m.topic for m in got] == newest
        pages = await store.replay("#", last=5, upto=upto)
        assert [m.topic for m in await pages.next()] == newest
        pages = await store.replay("t/+", last=3, upto=upto)
        assert [m.topic for m in await pages.next()] == newest[1:4]
    finally:
        await store.close()


async def _replayed(peer: Peer, topic: str, last: int) -> list[dict[str, object]]:
    """``sub`` ``topic`` with ``last``: its ``msg`` frames, once the next request's reply
    says the replay is over."""
    assert (await peer.request("sub", topic=topic, last=last))["op"] == "ok"
    msgs: list[dict[str, object]] = []
    await peer.send({"op": "unsub", "id": 10**6, "topic": topic})
    while (frame := await peer.recv(timeout=10))["op"] == "msg":
        msgs.append(frame)
    assert frame["id"] == 10**6
    return msgs


async def test_a_one_topic_replay_does_not_wait_for_other_topics_commit_log(
    broker: BrokerThread,
) -> None:
    assert broker.server is not None and isinstance(broker.server.store, SqliteStore)
    path = broker.server.store.path
    pub = await Peer.open(broker.url, broker.token("pub"))
    victim = await Peer.open(broker.url, broker.token("victim"))
    readers = [await Peer.open(broker.url, broker.token(f"reader{n}")) for n in range(8)]
    for i in range(3):
        assert (await pub.request("pub", topic="mine/t", data=i))["op"] == "ok"
    assert [m["data"] for m in await _replayed(victim, "mine/t", 5)] == [0, 1, 2]
    # Another program holds SQLite's write lock: what the commit log takes from now on
    # (the pair's publish) cannot reach SQLite until it lets go.
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        assert (await pub.request("pub", topic="pair/t", data="p"))["op"] == "ok"
        # History readers' `sub #` with last: 5 need that message in SQLite: they wait.
        for n, reader in enumerate(readers):
            await reader.send({"op": "sub", "id": n, "topic": "#", "last": 5})
        # The victim's topic has nothing in the commit log: its replay does not wait
        # (it waited for SQLite to take the pair's message, behind the readers' applies).
        assert [m["data"] for m in await _replayed(victim, "mine/t", 5)] == [0, 1, 2]
        for reader in readers:
            await reader.expect_nothing(0.05)  # still waiting: the victim went first
    finally:
        other.execute("ROLLBACK")
        other.close()
    # The readers' replays hold exactly what they did.
    for n, reader in enumerate(readers):
        ok = await reader.recv(timeout=10)
        assert ok["op"] == "ok" and ok["id"] == n, ok
        got = [await reader.recv(timeout=10) for _ in range(4)]
        assert [(m["topic"], m["data"]) for m in got] == [
            ("mine/t", 0),
            ("mine/t", 1),
            ("mine/t", 2),
            ("pair/t", "p"),
        ]
    for peer in (pub, victim, *readers):
        await peer.close()


async def _read_all(pages: Pages) -> list[str]:
    topics: list[str] = []
    for _ in range(1000):
        page = await pages.next()
        if not page:
            return topics
        topics += [m.topic for m in page]
    raise AssertionError("a replay that never ends")


async def test_a_replay_over_many_topics_stops_at_a_gap_of_its_own_topics(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "broker.sqlite3", 3)
    await store.open()
    try:
        now = int(time.time() * 1000)
        await store.append([Draft(f"w/{i}", b"1", "u", "u", now) for i in range(1200)])
        pages = await store.replay("#", since=0, upto=store.last_seq, page_size=100)
        first = await pages.next()
        assert [m.topic for m in first] == [f"w/{i}" for i in range(100)]
        # A topic newer than the replay, trimmed by its bound (3): none of its messages
        # is in the replay, no gap.
        await store.append([Draft("late", b"2", "u", "u", now) for _ in range(5)])
        await store.read_last("late", 1, store.last_seq)  # SQLite applies the bound
        assert len(await pages.next()) == 100 and not pages.gap
        # One of the replay's topics, trimmed past where the replay is: a gap.
        await store.append([Draft("w/1199", b"3", "u", "u", now) for _ in range(3)])
        await store.read_last("w/1199", 1, store.last_seq)
        rest = await _read_all(pages)
        assert pages.gap and "w/1199" not in rest
        # A replay begun after the trim is whole again (recovered: false from 0).
        again = await store.replay("#", since=0, upto=store.last_seq)
        assert again.recovered is False and not again.gap
        assert len(await _read_all(again)) == 1199 + 3 + 3
    finally:
        await store.close()
