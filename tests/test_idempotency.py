"""Idempotent publishing (section 8 of docs/protocol.md): ``key`` on ``pub`` and on
``POST /api/publish``, against real brokers (SQLite, memory, and a Redis cluster)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import pytest

from broker.client import Client

from . import test_cluster
from .harness import Broker
from .support import ROOT, BrokerProcess, Peer, isolated_env
from .test_cluster import NodeFactory
from .test_http_api import call, error_of, history, publish

# The cluster tests' nodes on the session's redis-server (redis_server: tests/conftest.py).
nodes = test_cluster.nodes


async def pub(peer: Peer, topic: str, data: Any, key: Any) -> dict[str, Any]:
    return await peer.request("pub", topic=topic, data=data, key=key)


async def test_a_repeated_key_is_delivered_once(broker: Broker) -> None:
    sub = await Peer.open(broker.url, broker.token("2"))
    await sub.request("sub", topic="t")
    peer = await Peer.open(broker.url, broker.token("1"))
    first = await pub(peer, "t", "a", "k1")
    assert first == {"op": "ok", "id": first["id"], "seq": 1}
    again = await pub(peer, "other", "b", "k1")  # whatever its topic and data
    assert again == {"op": "ok", "id": again["id"], "seq": 1, "duplicate": True}
    assert (await sub.recv())["seq"] == 1
    await sub.expect_nothing()
    assert [m["seq"] for m in history(broker, "topic=%23&last=10")[2]["messages"]] == [1]
    await peer.close()
    await sub.close()


async def test_same_key_in_flight_at_once_publishes_once(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    for i in range(10):  # pipelined: all in one journal batch or a few
        await peer.send({"op": "pub", "id": i, "topic": "t", "data": i, "key": "racy"})
    replies = [await peer.recv() for _ in range(10)]
    assert {r["seq"] for r in replies} == {1}
    assert sum(1 for r in replies if r.get("duplicate")) == 9
    assert len(history(broker, "topic=t&last=10")[2]["messages"]) == 1
    await peer.close()


@pytest.mark.parametrize("key", [None, 5, "", "x" * 129, ["k"], True])
async def test_key_must_be_a_short_string(broker: Broker, key: Any) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    reply = await pub(peer, "t", 1, key)
    assert reply["op"] == "error" and reply["code"] == "bad_request"
    reply = await pub(peer, "t", 1, "é" * 128)  # code points, not bytes
    assert reply["op"] == "ok"
    await peer.close()


async def test_keys_are_per_user(broker: Broker) -> None:
    one = await Peer.open(broker.url, broker.token("1"))
    two = await Peer.open(broker.url, broker.token("2"))
    assert (await pub(one, "t", 1, "k"))["seq"] == 1
    reply = await pub(two, "t", 2, "k")
    assert reply["seq"] == 2 and "duplicate" not in reply
    await one.close()
    await two.close()


async def test_a_refused_publish_records_no_key(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("1", pub=["ok/#"]))
    assert (await pub(peer, "no", 1, "k"))["code"] == "forbidden"
    reply = await pub(peer, "ok/1", 1, "k")
    assert reply["seq"] == 1 and "duplicate" not in reply
    await peer.close()


async def test_key_across_websocket_and_http(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    first = await pub(peer, "t", 1, "shared")
    status, _, body = publish(broker, {"topic": "t", "data": 2, "key": "shared"}, broker.token("1"))
    assert status == 200 and body == {"seq": first["seq"], "duplicate": True}
    status, _, batch = publish(
        broker, {"topics": ["a", "b"], "data": 3, "key": "b1"}, broker.token("1")
    )
    assert status == 200 and "duplicate" not in batch
    reply = await pub(peer, "t", 4, "b1")
    assert reply["seqs"] == batch["seqs"] and reply["duplicate"] is True
    status, _, body = publish(
        broker, {"topics": ["x", "y"], "data": 3, "key": "b1"}, broker.token("1")
    )
    assert body == {"seqs": batch["seqs"], "duplicate": True}
    assert history(broker, "topic=%23&last=10")[2]["seq"] == 3
    await peer.close()


@pytest.mark.process
async def test_key_survives_kill_9_and_restart(broker: BrokerProcess) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    first = await pub(peer, "t", 1, "crash")
    broker.kill()
    await asyncio.to_thread(broker.start)
    peer = await Peer.open(broker.url, broker.token("1"))
    assert await pub(peer, "t", 2, "crash") == {
        "op": "ok",
        "id": 1,
        "seq": first["seq"],
        "duplicate": True,
    }
    await peer.close()


@pytest.mark.slow
async def test_the_window_expires(make_broker: Any) -> None:
    for store in ({"memory": True}, {}):
        broker = make_broker("--dedupe-window", "1s", **store)
        peer = await Peer.open(broker.url, broker.token("1"))
        assert (await pub(peer, "t", 1, "w"))["seq"] == 1
        assert (await pub(peer, "t", 1, "w"))["duplicate"] is True
        deadline = time.monotonic() + 5
        while True:
            reply = await pub(peer, "t", 1, "w")
            if "duplicate" not in reply:
                break
            assert time.monotonic() < deadline, "the key never expired"
            await asyncio.sleep(0.1)
        assert reply["seq"] == 2
        await peer.close()


@pytest.mark.slow
@pytest.mark.redis
async def test_key_across_cluster_nodes(nodes: NodeFactory) -> None:
    a, b = nodes(2)
    peer = await Peer.open(a.url, a.token("1"))
    first = await pub(peer, "t", 1, "node-key")
    status, _, body = publish(b, {"topic": "t", "data": 2, "key": "node-key"}, b.token("1"))
    assert status == 200 and body == {"seq": first["seq"], "duplicate": True}
    other = await Peer.open(b.url, b.token("1"))
    reply = await pub(other, "u", 3, "node-key")
    assert reply["seq"] == first["seq"] and reply["duplicate"] is True
    assert (await pub(other, "u", 3, "fresh"))["seq"] == first["seq"] + 1
    await peer.close()
    await other.close()


@pytest.mark.slow
@pytest.mark.redis
async def test_cluster_window_expires(nodes: NodeFactory) -> None:
    (a,) = nodes(1, "--dedupe-window", "1s")
    peer = await Peer.open(a.url, a.token("1"))
    assert (await pub(peer, "t", 1, "w"))["seq"] == 1
    deadline = time.monotonic() + 5
    while "duplicate" in (reply := await pub(peer, "t", 1, "w")):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert reply["seq"] == 2
    await peer.close()


def test_http_duplicate_keeps_its_status(broker: Broker) -> None:
    token = broker.token("1")
    assert publish(broker, {"topic": "t", "data": 1, "key": "h"}, token)[2] == {"seq": 1}
    assert publish(broker, {"topic": "t", "data": 1, "key": "h"}, token)[2] == {
        "seq": 1,
        "duplicate": True,
    }
    # Checked first: a forbidden publish with a used key is still forbidden.
    assert error_of(publish(broker, {"topic": "$x", "data": 1, "key": "h"}, token)) == (
        403,
        "forbidden",
    )
    assert (
        call(broker, "GET", "/api/stats", token=broker.token("a", admin=True))[2]["last_seq"] == 1
    )


# -- the client and `broker pub` retry with their keys --------------------------------------


def all_data(broker: Broker, topic: str) -> list[Any]:
    """Every retained message of ``topic`` in seq order, over as many pages as it takes."""
    out: list[Any] = []
    since = 0
    while True:
        page = history(broker, f"topic={topic}&since={since}")[2]
        out += [m["data"] for m in page["messages"]]
        if not page["more"]:
            return out
        since = page["messages"][-1]["seq"]


@pytest.mark.process
async def test_client_publishes_survive_a_broker_restart_exactly_once(
    broker: BrokerProcess,
) -> None:
    n = 400
    acked: list[int] = []
    async with Client(broker.url, broker.token("1"), backoff_initial=0.05, backoff_max=0.2) as c:
        window = asyncio.Semaphore(20)

        async def one(i: int) -> None:
            async with window:
                await c.publish("stream", i)
                acked.append(i)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        deadline = time.monotonic() + 10
        while len(acked) < n // 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.to_thread(broker.kill)  # kill -9 with publishes in flight
        await asyncio.to_thread(broker.start)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert c.reconnects >= 1
    assert sorted(acked) == list(range(n))
    data = all_data(broker, "stream")
    assert sorted(data) == list(range(n)), "a message was lost or published twice"


@pytest.mark.process
def test_broker_pub_from_stdin_survives_a_restart(broker: BrokerProcess) -> None:
    env = isolated_env(broker.home)
    env["BROKER_TOKEN"] = broker.token("1")
    env["BROKER_URL"] = broker.url
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "pub", "lines", "--json"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    try:
        for i in range(150):
            proc.stdin.write(f"{i}\n".encode())
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while len(all_data(broker, "lines")) < 50:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        broker.kill()
        broker.start()
        for i in range(150, 300):
            proc.stdin.write(f"{i}\n".encode())
        proc.stdin.close()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    assert proc.returncode == 0, proc.stderr.read().decode()
    assert sorted(all_data(broker, "lines")) == list(range(300))
