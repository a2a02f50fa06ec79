"""``latest`` (section 9 of docs/protocol.md): the most recent retained message of each
matching topic, from every store's per-topic index, on ``sub``, on the HTTP history, and
across two cluster nodes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.core.model import Draft
from broker.core.protocol import Sub, encode_request, parse_request
from broker.errors import BadRequest
from broker.store.base import Store
from broker.store.memory import MemoryStore
from broker.store.sqlite import SqliteStore

from .support import BrokerProcess, Peer, RedisServer


def draft(topic: str, data: Any) -> Draft:
    return Draft(topic, json.dumps(data).encode(), "u", "U", int(time.time() * 1000))


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore(history=5)
    elif request.param == "sqlite":
        s = SqliteStore(tmp_path / "db", history=5)
    else:
        from broker.store.redis.store import RedisStore

        server: RedisServer = request.getfixturevalue("redis_server")
        server.ensure_running()
        server.flush()
        s = RedisStore(server.url, history=5)
    await s.open()
    yield s
    await s.close()


async def test_latest_per_topic_in_every_store(store: Store) -> None:
    # (The Redis store's last_seq moves as it follows the stream: the seqs come from here.)
    await store.append([draft("scores/a", 1), draft("scores/b", 1), draft("chat", 1)])
    upto = (await store.append([draft("scores/a", 2), draft("scores/c/x", 1)]))[-1].seq
    top = (await store.append([draft("scores/b", 2)]))[-1].seq  # after upto: not seen
    found = await store.latest("scores/#", upto)
    assert [(m.topic, m.data) for m in found] == [
        ("scores/b", 1),
        ("scores/a", 2),
        ("scores/c/x", 1),
    ]
    assert [m.seq for m in found] == sorted(m.seq for m in found)
    now = await store.latest("scores/+", top)
    assert [(m.topic, m.data) for m in now] == [("scores/a", 2), ("scores/b", 2)]
    assert [m.data for m in await store.latest("chat", top)] == [1]
    assert await store.latest("nothing/#", top) == []


async def test_latest_keeps_the_highest_seqs_and_skips_invisible_topics(store: Store) -> None:
    top = (await store.append([draft(f"t/{i}", i) for i in range(12)]))[-1].seq
    found = await store.latest("t/#", top, limit=4)
    assert [m.topic for m in found] == ["t/8", "t/9", "t/10", "t/11"]
    hidden = await store.latest("t/#", top, limit=4, visible=lambda t: t != "t/11")
    assert [m.topic for m in hidden] == ["t/7", "t/8", "t/9", "t/10"]


def test_latest_on_the_wire() -> None:
    frame = parse_request('{"op":"sub","id":1,"topic":"a/#","latest":true}')
    assert frame == Sub(id=1, topic="a/#", latest=True)
    assert parse_request(encode_request(frame).decode()) == frame
    assert parse_request('{"op":"sub","id":1,"topic":"a","latest":false}') == Sub(1, "a")
    for bad in ('"latest":1', '"latest":true,"last":2', '"latest":true,"since":0'):
        with pytest.raises(BadRequest):
            parse_request('{"op":"sub","id":1,"topic":"a",' + bad + "}")


async def publish(peer: Peer, topic: str, data: Any) -> int:
    reply = await peer.request("pub", topic=topic, data=data)
    assert reply["op"] == "ok", reply
    return int(reply["seq"])


async def test_sub_latest_replays_one_message_per_topic_then_live(broker: BrokerProcess) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    for topic, score in [("scores/a", "0-0"), ("scores/b", "1-0"), ("scores/a", "1-0")]:
        await publish(pub, topic, score)
    await publish(pub, "user/bob/x", "private")
    await publish(pub, "user/alice/x", "mine")
    alice = await Peer.open(broker.url, broker.token("alice"))
    ok = await alice.request("sub", topic="scores/#", latest=True)
    assert ok["op"] == "ok" and ok["recovered"] is True
    got = [await alice.recv() for _ in range(2)]
    assert [(m["topic"], m["data"]) for m in got] == [("scores/b", "1-0"), ("scores/a", "1-0")]
    seq = await publish(pub, "scores/b", "2-0")
    live = await alice.recv()
    assert (live["topic"], live["seq"]) == ("scores/b", seq)
    # Inbox privacy: another user's inbox never comes back, one's own does.
    ok = await alice.request("sub", topic="user/+/x", latest=True)
    assert ok["op"] == "ok"
    mine = await alice.recv()
    assert (mine["topic"], mine["data"]) == ("user/alice/x", "mine")
    await alice.expect_nothing()
    refused = await alice.request("sub", topic="a", latest=True, last=1)
    assert refused["code"] == "bad_request"


def history(broker: BrokerProcess, token: str, **query: str) -> tuple[int, dict[str, Any]]:
    url = f"{broker.http_url}/api/history?{urllib.parse.urlencode(query)}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_http_history_latest(broker: BrokerProcess) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    for topic, score in [("scores/a", 1), ("scores/b", 1), ("scores/a", 2)]:
        await publish(pub, topic, score)
    token = broker.token("reader")
    for flag in ("true", "1"):
        status, body = history(broker, token, topic="scores/+", latest=flag)
        assert status == 200
        assert [(m["topic"], m["data"]) for m in body["messages"]] == [
            ("scores/b", 1),
            ("scores/a", 2),
        ]
        assert body["more"] is False and body["recovered"] is True
        assert set(body["messages"][0]) == {"topic", "seq", "data", "from", "ts"}
    status, body = history(broker, token, topic="scores/+", latest="false")
    assert status == 200 and body["messages"] == []
    status, body = history(broker, token, topic="scores/+", latest="true", last="1")
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = history(broker, token, topic="scores/+", latest="yes")
    assert status == 400


@pytest.mark.slow
@pytest.mark.redis
async def test_latest_across_two_cluster_nodes(redis_server: RedisServer, tmp_path: Path) -> None:
    from .test_cluster import Node

    redis_server.ensure_running()
    redis_server.flush()
    a = Node(tmp_path / "a", redis_server.url).start()
    b = Node(tmp_path / "b", redis_server.url).start()
    try:
        pub = await Peer.open(a.url, a.token("p"))
        for topic, score in [("scores/a", 1), ("scores/b", 1), ("scores/a", 2)]:
            await publish(pub, topic, score)
        reader = await Peer.open(b.url, b.token("r"))
        ok = await reader.request("sub", topic="scores/#", latest=True)
        assert ok["op"] == "ok"
        got = [await reader.recv() for _ in range(2)]
        assert [(m["topic"], m["data"]) for m in got] == [("scores/b", 1), ("scores/a", 2)]
        seq = await publish(pub, "scores/a", 3)
        assert (await reader.recv())["seq"] == seq
        await reader.expect_nothing()
    finally:
        a.kill()
        b.kill()


async def test_a_later_replay_skips_what_a_latest_replay_delivered(broker: BrokerProcess) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    a1, b1, a2 = [await publish(pub, t, i) for i, t in enumerate(["s/a", "s/b", "s/a"])]
    reader = await Peer.open(broker.url, broker.token("r"))
    assert (await reader.request("sub", topic="s/#", latest=True))["op"] == "ok"
    assert [(await reader.recv())["seq"] for _ in range(2)] == [b1, a2]
    # Each topic's latest message is delivered; the older one of s/a is not yet.
    assert (await reader.request("sub", topic="s/+", last=10))["op"] == "ok"
    assert (await reader.recv())["seq"] == a1
    await reader.expect_nothing()
