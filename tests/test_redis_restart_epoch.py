"""Nodes that were not looking when Redis came back older (started after the restart, or
all restarted) still never hand out an (epoch, seq) twice: the epoch is recorded in Redis
with the run_id of the redis-server serving it, and the first node to reach another
server (restarted from disk, failed over) starts a new epoch, once. A restart that lost
nothing starts one too (the price of not being able to tell); a node restarted against
the same redis-server does not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .checker import Checker, History
from .redis_procs import Node, RedisProc, need_redis
from .support import Peer
from .test_redis_history import publish, received

pytestmark = pytest.mark.redis

#: Enough history that no acknowledged message of a run is trimmed by the count limit.
HISTORY = ("--history", "100000")
SERVER_CHANGED = "another Redis server serves the history"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[[str], RedisProc]]:
    """``redis_server(persistence)``: a started redis-server, killed after the test."""
    need_redis()
    made: list[RedisProc] = []

    def factory(persistence: str) -> RedisProc:
        made.append(RedisProc(tmp_path / "redis", persistence).start())
        return made[-1]

    yield factory
    for server in made:
        server.kill()


async def checked(nodes: list[Node], fault: Callable[[], Any]) -> History:
    """The checker against ``nodes``: 60 publishes, ``fault`` (off the event loop), 60
    more; every guarantee checked (no (epoch, seq) names two messages among them)."""
    checker = Checker([n.url for n in nodes], nodes[0].token)
    async with checker.running(publishers=2, subscribers=2):
        await checker.wait_acks(60)
        await asyncio.get_running_loop().run_in_executor(None, fault)
        await checker.wait_acks(120, timeout=30)
    history = await checker.finish()
    history.check()
    return history


@pytest.mark.slow
async def test_a_node_started_after_redis_came_back_older(
    redis_server: Callable[[str], RedisProc], tmp_path: Path
) -> None:
    """The only node is gone while Redis restarts from an older snapshot; a new node
    (nothing to compare with) starts a new epoch instead of handing the lost seqs out
    again."""
    rdb = redis_server("rdb")
    old = Node(tmp_path / "old", rdb.url, *HISTORY).start()
    fresh = Node(tmp_path / "fresh", rdb.url, *HISTORY)

    def fault() -> None:
        rdb.save()
        time.sleep(0.3)  # acknowledged after the snapshot: these go
        old.kill()
        rdb.restart()
        fresh.start()

    try:
        history = await checked([old, fresh], fault)
    finally:
        old.kill()
        fresh.kill()
    figures = history.figures()
    print(f"\nfresh node after an older snapshot: {figures}")
    assert figures["epochs"] == 2 and figures["gone_from_history"] > 0
    assert fresh.log().count(SERVER_CHANGED) == 1


@pytest.mark.slow
async def test_every_node_restarted_after_redis_came_back_older(
    redis_server: Callable[[str], RedisProc], tmp_path: Path
) -> None:
    rdb = redis_server("rdb")
    nodes = [Node(tmp_path / f"n{i}", rdb.url, *HISTORY).start() for i in range(2)]

    def fault() -> None:
        rdb.save()
        time.sleep(0.3)
        for node in nodes:
            node.kill()
        rdb.restart()
        for node in nodes:
            node.start()

    try:
        history = await checked(nodes, fault)
    finally:
        for node in nodes:
            node.kill()
    figures = history.figures()
    print(f"\nevery node restarted after an older snapshot: {figures}")
    assert figures["epochs"] == 2 and figures["gone_from_history"] > 0
    # One new epoch, started (and logged) by the first node to reach the new server.
    assert sum(n.log().count(SERVER_CHANGED) for n in nodes) == 1


async def test_a_restart_that_lost_nothing_starts_a_new_epoch(
    redis_server: Callable[[str], RedisProc], tmp_path: Path
) -> None:
    """AOF fsynced on every write: the restart keeps everything, but no node can prove it,
    so the first one to reach the restarted server starts a new epoch (seqs a gap above
    the old ones). Live subscribers keep receiving; a resume with the old epoch answers
    recovered: false and replays everything, which is all still there."""
    aof = redis_server("aof-always")
    node = Node(tmp_path / "n0", aof.url).start()
    try:
        sub = await Peer.open(node.url, node.token("s"))
        epoch = (await sub.request("sub", topic="t"))["epoch"]
        pub = await Peer.open(node.url, node.token("p"))
        a = await publish(pub, "t", [f"a{i}" for i in range(5)])
        assert await received(sub, 5) == list(zip(a, [f"a{i}" for i in range(5)]))

        aof.restart()  # kill -9; every acknowledged write was fsynced
        (b,) = await publish(pub, "t", ["b0"])
        assert b > 1_000_000
        assert await received(sub, 1) == [(b, "b0")]

        late = await Peer.open(node.url, node.token("late"))
        ok = await late.request("sub", topic="t", since=5, epoch=epoch)
        assert ok["recovered"] is False and ok["epoch"] != epoch
        assert await received(late, 6) == [*zip(a, [f"a{i}" for i in range(5)]), (b, "b0")]
        assert node.log().count(SERVER_CHANGED) == 1
        assert "history went back" not in node.log()
    finally:
        node.kill()


@pytest.mark.slow
async def test_a_node_restarted_on_the_same_redis_keeps_the_epoch(
    redis_server: Callable[[str], RedisProc], tmp_path: Path
) -> None:
    server = redis_server("none")
    node = Node(tmp_path / "n0", server.url).start()
    try:
        pub = await Peer.open(node.url, node.token("p"))
        epoch = (await pub.request("sub", topic="t"))["epoch"]
        await publish(pub, "t", ["a0"])
        node.kill()
        node.start()
        late = await Peer.open(node.url, node.token("late"))
        ok = await late.request("sub", topic="t", since=0, epoch=epoch)
        assert ok["epoch"] == epoch and ok["recovered"] is True
        assert [d for _, d in await received(late, 1)] == ["a0"]
        assert SERVER_CHANGED not in node.log()
    finally:
        node.kill()


async def test_deleting_the_server_key_starts_a_new_epoch(
    redis_server: Callable[[str], RedisProc], tmp_path: Path
) -> None:
    """The recipe after history was loaded into a running redis-server by hand (its run_id
    stays): delete ``server``; the next append starts a new epoch, logged once."""
    server = redis_server("none")
    node = Node(tmp_path / "n0", server.url).start()
    try:
        sub = await Peer.open(node.url, node.token("s"))
        epoch = (await sub.request("sub", topic="t"))["epoch"]
        pub = await Peer.open(node.url, node.token("p"))
        assert await publish(pub, "t", ["a0"]) == [1]
        assert server.client().delete("broker:server") == 1
        (seq,) = await publish(pub, "t", ["a1"])
        assert seq > 1_000_000
        assert [s for s, _ in await received(sub, 2)] == [1, seq]
        ok = await (await Peer.open(node.url, node.token("x"))).request(
            "sub", topic="t", since=1, epoch=epoch
        )
        assert ok["recovered"] is False and ok["epoch"] != epoch
        assert node.log().count(SERVER_CHANGED) == 1
    finally:
        node.kill()
