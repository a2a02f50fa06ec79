"""Public topics and anonymous connections (section 10 of docs/protocol.md): read-only,
public patterns only, never in presence, with caps of their own; on one node and across
two cluster nodes."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from broker.core.auth import Identity
from broker.core.protocol import Auth, encode_request, parse_request
from broker.errors import Forbidden
from broker.server.admission import AnonymousCaps

from .support import PUBLIC_SCORES, BrokerProcess, Peer, RedisServer, async_wait_for


def public_config(tmp_path: Path, text: str = PUBLIC_SCORES) -> str:
    path = tmp_path / "public.toml"
    path.write_text(text)
    return str(path)


async def anonymous(broker: BrokerProcess) -> tuple[Peer, dict[str, Any]]:
    peer = await Peer.open(broker.url)
    await peer.send({"op": "auth"})
    return peer, await peer.recv()


def test_auth_without_a_token_on_the_wire() -> None:
    assert parse_request('{"op":"auth"}') == Auth(token=None)
    assert parse_request('{"op":"auth","token":null,"id":3}') == Auth(token=None, id=3)
    assert encode_request(Auth(token=None)) == b'{"op":"auth"}'


def test_an_anonymous_identity_reads_public_patterns_only() -> None:
    ident = Identity.anonymous_reader(("scores/#",))
    ident.check_subscribe("scores/+")
    ident.check_subscribe("scores/uk/premier")
    for pattern in ("#", "chat", "user/+", "+/x"):
        with pytest.raises(Forbidden):
            ident.check_subscribe(pattern)
    with pytest.raises(Forbidden):
        ident.check_publish("scores/a")
    assert ident.user_json() == {"id": "", "name": ""}


def test_anonymous_caps_total_and_per_address() -> None:
    caps = AnonymousCaps(total=3, per_address=2)
    assert caps.admit("10.0.0.1:1") is None
    assert caps.admit("10.0.0.1:2") is None
    assert caps.admit("10.0.0.1:3") == "anonymous_per_address"
    assert caps.admit("10.0.0.2:1") is None
    assert caps.admit("10.0.0.3:1") == "anonymous"
    caps.release("10.0.0.1:1")
    assert caps.admit("10.0.0.3:1") is None
    assert caps.count == 3


async def test_without_public_patterns_anonymous_is_refused(broker: BrokerProcess) -> None:
    peer, frame = await anonymous(broker)
    assert frame["op"] == "error" and frame["code"] == "unauthorized"
    with pytest.raises(ConnectionClosed) as info:
        await peer.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 4001


async def test_an_anonymous_connection_reads_public_topics_and_nothing_else(
    make_broker: Any, tmp_path: Path
) -> None:
    broker: BrokerProcess = make_broker("--config", public_config(tmp_path))
    pub = await Peer.open(broker.url, broker.token("p"))
    first = await pub.request("pub", topic="scores/a", data="1-0")
    peer, hello = await anonymous(broker)
    assert hello == {
        "op": "hello",
        "user": {"id": "", "name": ""},
        "anonymous": True,
        "server": hello["server"],
    }
    ok = await peer.request("sub", topic="scores/#", latest=True)
    assert ok["op"] == "ok"
    assert (await peer.recv())["seq"] == first["seq"]
    for op, fields in [
        ("sub", {"topic": "chat"}),
        ("sub", {"topic": "#"}),
        ("sub", {"topic": "user/p"}),
        ("pub", {"topic": "scores/a", "data": 1}),
        ("presence", {"topic": "scores/a"}),
        ("stats", {}),
        ("auth", {"token": broker.token("p")}),
    ]:
        reply = await peer.request(op, **fields)
        assert reply["op"] == "error" and reply["code"] == "forbidden", (op, reply)
    assert (await peer.request("unsub", topic="chat"))["op"] == "ok"
    live = await pub.request("pub", topic="scores/b", data="0-1")
    assert (await peer.recv())["seq"] == live["seq"]
    await pub.request("pub", topic="chat", data="not public")
    await peer.expect_nothing()


async def test_anonymous_connections_are_never_in_presence(
    make_broker: Any, tmp_path: Path
) -> None:
    broker: BrokerProcess = make_broker("--config", public_config(tmp_path))
    watcher = await Peer.open(broker.url, broker.token("w"))
    assert (await watcher.request("sub", topic="scores/a", presence=True))["op"] == "ok"
    peer, _ = await anonymous(broker)
    assert (await peer.request("sub", topic="scores/a"))["op"] == "ok"
    await watcher.expect_nothing()
    users = (await watcher.request("presence", topic="scores/a"))["users"]
    assert [u["id"] for u in users] == ["w"]
    await peer.close()
    await watcher.expect_nothing()


def metrics(broker: BrokerProcess) -> str:
    with urllib.request.urlopen(f"{broker.http_url}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_anonymous_caps_refuse_with_1013_and_count(make_broker: Any, tmp_path: Path) -> None:
    broker: BrokerProcess = make_broker(
        "--config", public_config(tmp_path), "--max-anonymous", "3",
        "--max-anonymous-per-address", "2",
    )  # fmt: skip
    peers = []
    for _ in range(2):
        peer, hello = await anonymous(broker)
        assert hello["op"] == "hello"
        peers.append(peer)
    assert "broker_anonymous_connections 2.0" in metrics(broker)
    refused, frame = await anonymous(broker)  # a third from 127.0.0.1: per-address cap
    assert frame["op"] == "error" and frame["code"] == "unavailable"
    with pytest.raises(ConnectionClosed) as info:
        await refused.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1013
    # A user with a token is not held back by the anonymous caps.
    await Peer.open(broker.url, broker.token("u"))
    await peers.pop().close()
    await async_wait_for(lambda: "broker_anonymous_connections 1.0" in metrics(broker))
    again, hello = await anonymous(broker)
    assert hello["op"] == "hello"
    text = metrics(broker)
    assert 'broker_limit_hits_total{limit="anonymous_per_address"} 1.0' in text
    assert "limit reached: max_anonymous_per_address" in broker.log()


@pytest.mark.slow
@pytest.mark.redis
async def test_anonymous_across_two_cluster_nodes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    from .test_cluster import Node

    redis_server.ensure_running()
    redis_server.flush()
    config = public_config(tmp_path)
    a = Node(tmp_path / "a", redis_server.url, "--config", config).start()
    b = Node(tmp_path / "b", redis_server.url, "--config", config).start()
    try:
        watcher = await Peer.open(a.url, a.token("w"))
        assert (await watcher.request("sub", topic="scores/a", presence=True))["op"] == "ok"
        peer, hello = await anonymous(b)
        assert hello["anonymous"] is True
        assert (await peer.request("sub", topic="scores/a"))["op"] == "ok"
        pub = await Peer.open(a.url, a.token("p"))
        sent = await pub.request("pub", topic="scores/a", data=1)
        assert (await peer.recv())["seq"] == sent["seq"]
        assert (await watcher.recv())["op"] == "msg"  # and no join
        await watcher.expect_nothing()
        users = (await watcher.request("presence", topic="scores/a"))["users"]
        assert [u["id"] for u in users] == ["w"]
    finally:
        a.kill()
        b.kill()
