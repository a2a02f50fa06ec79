"""Cluster mode against a real ``redis-server`` and real broker nodes (``serve --redis``).

One redis-server per test session on a free port (never the machine's 6379: the
``redis_server`` fixture of tests/conftest.py), flushed before each test; every test starts
its own two or three nodes on it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.client import Client
from broker.errors import Unavailable
from broker.store.redis.store import Draft, decode_member, encode_tail

from .harness import BrokerThread
from .support import BrokerProcess, Peer, RedisServer, async_wait_for

pytestmark = pytest.mark.redis


def _without_data(cmd: list[str]) -> list[str]:
    """A node keeps its history in Redis: no --data."""
    i = cmd.index("--data")
    return cmd[:i] + cmd[i + 2 :]


class Node(BrokerProcess):
    """A broker node in cluster mode as a ``broker serve`` process."""

    def __init__(self, home: Path, redis_url: str, *args: str) -> None:
        super().__init__(home, "--redis", redis_url, *args)

    def command(self) -> list[str]:
        return _without_data(super().command())


class NodeThread(BrokerThread):
    """A broker node in cluster mode in this process."""

    def __init__(self, home: Path, redis_url: str, *args: str) -> None:
        super().__init__(home, "--redis", redis_url, *args)

    def command(self) -> list[str]:
        return _without_data(super().command())


NodeFactory = Callable[..., list[Any]]


@pytest.fixture
def nodes(
    request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path
) -> Iterator[NodeFactory]:
    """``nodes(3, "--history", "5")``: that many nodes on a freshly flushed Redis, in this
    process, or ``broker serve`` processes for tests marked ``process``."""
    redis_server.ensure_running()  # a previous test may have killed it
    redis_server.flush()
    host = Node if request.node.get_closest_marker("process") else NodeThread
    started: list[Node | NodeThread] = []

    def factory(n: int, *args: str) -> list[Any]:
        made = [host(tmp_path / f"n{len(started) + i}", redis_server.url, *args) for i in range(n)]
        started.extend(made)
        for node in made:
            node.start()
        return made

    yield factory
    for node in started:
        node.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Retry ``check`` until it is true: cluster-wide state converges within a round trip
    (presence transitions) or a heartbeat (connection counts, stats)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def publish_many(peer: Peer, items: list[tuple[str, Any]], base: int = 100_000) -> list[int]:
    """Publish pipelined with ids; the acknowledged seqs in order."""
    for i, (topic, data) in enumerate(items):
        await peer.send({"op": "pub", "topic": topic, "data": data, "id": base + i})
    seqs: dict[int, int] = {}
    while len(seqs) < len(items):
        frame = await peer.recv(timeout=10)
        assert frame["op"] in ("ok", "msg"), frame
        if frame["op"] == "ok":
            seqs[frame["id"] - base] = frame["seq"]
    return [seqs[i] for i in range(len(items))]


async def messages(peer: Peer, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        frame = await peer.recv(timeout)
        if frame["op"] == "msg":
            out.append(frame)
    return out


def test_member_encoding_is_binary_safe() -> None:
    draft = Draft("a/b", b'{"x":"\\n|1 2"}', "id 1\n|", "n\u00e9 \ud800", 1_700_000_000_123)
    msg = decode_member("a/b", b"42 " + encode_tail(draft))
    assert (msg.seq, msg.ts, msg.payload) == (42, draft.ts, draft.payload)
    assert (msg.sender_id, msg.sender_name) == (draft.sender_id, draft.sender_name)


async def test_sub_on_one_node_pub_on_another(nodes: NodeFactory) -> None:
    a, b = nodes(2)
    sub = await Peer.open(a.url, a.token("s"))
    assert (await sub.request("sub", topic="scores/+"))["op"] == "ok"
    pub = await Peer.open(b.url, b.token("p"))
    other = await Peer.open(a.url, a.token("p"))  # the publisher's user on another node
    await other.request("sub", topic="scores/uk")
    await pub.request("sub", topic="scores/uk")
    ok = await pub.request("pub", topic="scores/uk", data={"home": 2})
    got = (await messages(sub, 1))[0]
    assert got["seq"] == ok["seq"] and got["data"] == {"home": 2}
    assert got["from"] == {"id": "p", "name": "p"}
    assert (await messages(other, 1))[0]["seq"] == ok["seq"]
    await pub.expect_nothing()  # no echo to the publishing connection...
    await pub.send({"op": "pub", "id": "e", "topic": "scores/uk", "data": 2, "echo": True})
    # The own copy comes through Redis: before or after the ok.
    frames = [await pub.recv(), await pub.recv()]
    ok2 = next(f for f in frames if f["op"] == "ok")
    assert [f["seq"] for f in frames if f["op"] == "msg"] == [ok2["seq"]]  # ...unless asked


async def test_seq_order_with_concurrent_publishers_on_every_node(nodes: NodeFactory) -> None:
    cluster = nodes(3)
    subs = [await Peer.open(n.url, n.token(f"s{i}")) for i, n in enumerate(cluster)]
    for s in subs:
        await s.request("sub", topic="load/#")
    pubs = [await Peer.open(n.url, n.token(f"p{i}")) for i, n in enumerate(cluster)]
    per = 150
    acked = await asyncio.gather(
        *(publish_many(p, [(f"load/{i}", j) for j in range(per)]) for i, p in enumerate(pubs))
    )
    every = sorted(s for seqs in acked for s in seqs)
    assert len(set(every)) == 3 * per
    for seqs in acked:  # each publisher's own messages got increasing seqs
        assert seqs == sorted(seqs)
    for s in subs:
        got = [m["seq"] for m in await messages(s, 3 * per)]
        assert got == every  # all of them, strictly increasing, the same order everywhere


async def test_history_and_since_from_another_node(nodes: NodeFactory) -> None:
    a, b = nodes(2, "--history", "5")
    caught_up = await Peer.open(b.url, b.token("w"))
    await caught_up.request("sub", topic="h/#")
    pub = await Peer.open(a.url, a.token("p"))
    seqs = await publish_many(pub, [("h/x", i) for i in range(8)] + [("h/y", "y")])
    # B fans out what A acknowledged a moment later; an `ok` carries the seq B knows.
    await messages(caught_up, 9)
    reader = await Peer.open(b.url, b.token("r"))
    ok = await reader.request("sub", topic="h/x", last=3)
    assert ok["seq"] >= seqs[-1] and ok["recovered"] is True
    assert [m["data"] for m in await messages(reader, 3)] == [5, 6, 7]

    r2 = await Peer.open(b.url, b.token("r"))
    ok = await r2.request("sub", topic="h/+", since=seqs[5], epoch=ok["epoch"])
    assert ok["recovered"] is True
    assert [m["data"] for m in await messages(r2, 3)] == [6, 7, "y"]

    r3 = await Peer.open(b.url, b.token("r"))
    ok = await r3.request("sub", topic="h/x", since=seqs[0], epoch=ok["epoch"])
    assert ok["recovered"] is False  # only the latest 5 of h/x are kept
    assert [m["data"] for m in await messages(r3, 5)] == [3, 4, 5, 6, 7]

    r4 = await Peer.open(b.url, b.token("r"))
    ok = await r4.request("sub", topic="h/x", since=seqs[6], epoch="not-this-one")
    assert ok["recovered"] is False
    assert len(await messages(r4, 5)) == 5  # unknown epoch: everything retained


async def test_inbox_privacy_across_nodes(nodes: NodeFactory) -> None:
    a, b, c = nodes(3)
    alice = await Peer.open(a.url, a.token("alice"))
    await alice.request("sub", topic="user/alice/#")
    mallory = await Peer.open(a.url, a.token("mallory"))
    await mallory.request("sub", topic="#")
    assert (await mallory.request("sub", topic="user/alice"))["code"] == "forbidden"
    sender = await Peer.open(b.url, b.token("bob"))
    seq = (await sender.request("pub", topic="user/alice", data="hi"))["seq"]
    assert (await messages(alice, 1))[0]["seq"] == seq
    await mallory.expect_nothing()
    late = await Peer.open(c.url, c.token("mallory"))
    ok = await late.request("sub", topic="#", since=0)
    assert ok["seq"] >= seq
    await late.expect_nothing()  # not in replay either
    own = await Peer.open(c.url, c.token("alice"))
    await own.request("sub", topic="user/+", since=0)
    assert (await messages(own, 1))[0]["data"] == "hi"


@pytest.mark.process
async def test_presence_and_stats_cluster_wide_and_cleanup_after_kill(nodes: NodeFactory) -> None:
    a, b = nodes(2)
    watcher = await Peer.open(b.url, b.token("carol"))
    await watcher.request("sub", topic="room", presence=True)
    alice = [await Peer.open(a.url, a.token("alice", "Alice")) for _ in range(2)]
    for conn in alice:
        await conn.request("sub", topic="room")
    bob = await Peer.open(b.url, b.token("bob"))
    await bob.request("sub", topic="room")
    joined = {(f["op"], f["user"]["id"]) for f in [await watcher.recv(), await watcher.recv()]}
    assert joined == {("join", "alice"), ("join", "bob")}

    expected = [
        {"id": "alice", "name": "Alice", "connections": 2},
        {"id": "bob", "name": "bob", "connections": 1},
        {"id": "carol", "name": "carol", "connections": 1},
    ]
    for node in (a, b):
        asker = await Peer.open(node.url, node.token("dave"))

        async def right(asker: Peer = asker) -> bool:
            return (await asker.request("presence", topic="room"))["users"] == expected

        await eventually(right)

    admin = await Peer.open(b.url, b.token("admin", admin=True))

    async def counted() -> bool:
        stats = await admin.request("stats")
        return (
            stats["connections"] == 7 and stats["subscriptions"] == 4 and len(stats["nodes"]) == 2
        )

    await eventually(counted)

    await alice[1].close()  # one of two connections: no leave
    await watcher.expect_nothing(0.5)
    started = time.monotonic()
    a.kill()  # kill -9: alice's entries stay in Redis until the heartbeat expires
    frame = await watcher.recv(timeout=10)
    assert frame == {"op": "leave", "topic": "room", "user": {"id": "alice", "name": "Alice"}}
    assert time.monotonic() - started < 8
    users = (await watcher.request("presence", topic="room"))["users"]
    assert [u["id"] for u in users] == ["bob", "carol"]


@pytest.mark.process
async def test_graceful_shutdown_drops_presence_at_once(nodes: NodeFactory) -> None:
    a, b = nodes(2)
    watcher = await Peer.open(b.url, b.token("carol"))
    await watcher.request("sub", topic="room", presence=True)
    alice = await Peer.open(a.url, a.token("alice"))
    await alice.request("sub", topic="room")
    assert (await watcher.recv())["op"] == "join"
    assert await asyncio.to_thread(a.stop) == 0
    frame = await watcher.recv(timeout=2)
    assert (frame["op"], frame["user"]["id"]) == ("leave", "alice")


async def test_redis_restarted_mid_stream(nodes: NodeFactory, redis_server: RedisServer) -> None:
    a, b = nodes(2)
    sub = await Peer.open(a.url, a.token("s"))
    ok = await sub.request("sub", topic="live")
    epoch = ok["epoch"]
    pub = await Peer.open(b.url, b.token("p"))
    before = await publish_many(pub, [("live", i) for i in range(5)])
    assert [m["seq"] for m in await messages(sub, 5)] == before

    redis_server.kill()
    started = time.monotonic()
    refused = await pub.request("pub", topic="live", data="lost")
    assert refused["op"] == "error" and refused["code"] == "unavailable"
    assert time.monotonic() - started < 2.5
    redis_server.start()  # same port, no persistence: history is gone

    async def accepted() -> bool:
        reply = await pub.request("pub", topic="live", data="after")
        return reply["op"] == "ok"

    await eventually(accepted, timeout=10)  # the connections stayed open throughout
    after = await publish_many(pub, [("live", "x")])
    got = [m["seq"] for m in await messages(sub, 2)]
    assert got[-1] == after[0] and before[-1] < got[0] < got[1]  # seqs keep increasing

    late = await Peer.open(b.url, b.token("s"))
    ok = await late.request("sub", topic="live", since=before[-1], epoch=epoch)
    assert ok["recovered"] is False and ok["epoch"] != epoch
    assert [m["data"] for m in await messages(late, 2)] == ["after", "x"]
    assert "unreachable" in a.log() and "is back" in a.log()
    assert a.log().count("unreachable") == 1  # once per outage, not per message


@pytest.mark.process
async def test_node_killed_client_resumes_on_another(nodes: NodeFactory) -> None:
    a, b = nodes(2)
    received: list[int] = []
    client = Client([a.url, b.url], a.token("reader"), backoff_initial=0.05, backoff_max=0.5)
    await client.connect()
    await client.subscribe("feed")
    assert client.url == a.url
    pub = await Peer.open(b.url, b.token("writer"))
    acked: list[int] = []

    async def produce() -> None:
        for i in range(60):
            acked.append((await pub.request("pub", topic="feed", data=i))["seq"])
            await asyncio.sleep(0.01)  # spread over the failover, not all before it

    async def consume() -> None:
        while len(received) < 60:
            received.append((await client.next_message(timeout=10)).seq)

    producing = asyncio.create_task(produce())
    consuming = asyncio.create_task(consume())
    await async_wait_for(lambda: len(received) >= 15, 10)
    a.kill()
    await asyncio.wait_for(asyncio.gather(producing, consuming), 20)
    assert client.url == b.url and client.reconnects >= 1
    assert received == acked  # nothing lost, nothing twice, in order
    await client.close()


@pytest.mark.process
async def test_redis_wait_acknowledges_only_what_a_replica_has(
    redis_server: RedisServer, nodes: NodeFactory, tmp_path: Path
) -> None:
    replica = RedisServer(tmp_path)
    replica.start("--replicaof", "127.0.0.1", str(redis_server.port))
    try:
        deadline = time.monotonic() + 10
        while redis.Redis(port=replica.port).info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not sync"
            await asyncio.sleep(0.05)
        (node,) = nodes(1, "--redis-wait", "1", "--redis-wait-timeout", "0.5")
        async with Client(node.url, node.token("p")) as pub:
            seq = await pub.publish("kept", "on two machines")
            # The ok came after WAIT: the replica has the message already.
            stored = redis.Redis(port=replica.port).zrangebyscore("broker:h:kept", seq, seq)
            assert len(stored) == 1
            # A replica that stops answering: the primary records, but no ok is given.
            assert replica.proc is not None
            replica.proc.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(Unavailable, match="confirmed by 0 of 1 replicas"):
                    await pub.publish("kept", "only on the primary")
            finally:
                replica.proc.send_signal(signal.SIGCONT)
            assert await pub.publish("kept", "replicated again") > seq
    finally:
        replica.kill()


async def test_presence_name_follows_a_refresh_on_every_node(nodes: NodeFactory) -> None:
    a, b = nodes(2)
    alice = await Peer.open(a.url, a.token("alice", "Old Name"))
    assert (await alice.request("sub", topic="room"))["op"] == "ok"
    asker = await Peer.open(b.url, b.token("dave"))

    async def named(name: str) -> bool:
        users = (await asker.request("presence", topic="room"))["users"]
        return [(u["id"], u["name"]) for u in users] == [("alice", name)]

    await eventually(lambda: named("Old Name"))
    assert (await alice.request("auth", token=a.token("alice", "New Name")))["op"] == "ok"
    await eventually(lambda: named("New Name"))
