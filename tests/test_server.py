"""The protocol against a real broker process: auth, frames, topics, fan-out, ACL, presence."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .harness import Broker
from .support import SECRET, Peer


async def refused_status(url: str, header: str) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info:
        await connect(url, additional_headers={"Authorization": header}, open_timeout=5)
    response = info.value.response
    return response.status_code, response.body.decode()


# -- authentication --------------------------------------------------------------------


async def test_header_token(broker: Broker) -> None:
    peer = await Peer.open_with_header(broker.url, broker.token("123", "John"))
    assert await peer.recv() == {
        "op": "hello",
        "user": {"id": "123", "name": "John"},
        "server": "broker/0.1.0",
    }


async def test_first_frame_token_with_id_claim(broker: Broker) -> None:
    token = jwt.encode({"id": 123, "name": "John"}, SECRET, algorithm="HS256")
    peer = await Peer.open(broker.url)
    await peer.send({"op": "auth", "token": token, "id": 9})
    hello = await peer.recv()
    assert hello["op"] == "hello" and hello["user"] == {"id": "123", "name": "John"}
    await peer.expect_nothing()  # hello alone, no ok


@pytest.mark.parametrize(
    ("make_header", "reason"),
    [
        (lambda b: "Bearer " + b.token("1", ttl=-10), "token expired"),
        (
            lambda b: "Bearer " + jwt.encode({"sub": "1"}, "x" * 40, algorithm="HS256"),
            "invalid signature",
        ),
        (lambda b: "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.", "invalid algorithm 'none'"),
        (lambda b: "Bearer garbage", "malformed token"),
        (lambda b: "Bearer ", "empty bearer token"),
        (lambda b: "Basic dTpw", "Bearer scheme"),
        (
            lambda b: "Bearer " + jwt.encode({"sub": "1", "nbf": time.time() + 60}, SECRET),
            "not yet valid",
        ),
    ],
)
async def test_bad_header_token_is_401_with_reason(
    broker: Broker, make_header, reason: str
) -> None:  # type: ignore[no-untyped-def]
    status, body = await refused_status(broker.url, make_header(broker))
    assert status == 401
    assert reason in body.strip() and "\n" not in body.strip()


@pytest.mark.parametrize(
    ("first", "reason", "rid"),
    [
        ({"op": "auth", "token": "garbage", "id": 5}, "malformed token", 5),
        (
            {"op": "auth", "token": jwt.encode({"sub": "1"}, "x" * 40, algorithm="HS256")},
            "invalid signature",
            None,
        ),
        ({"op": "sub", "id": "s", "topic": "a"}, "first frame must be 'auth'", "s"),
        ("not json", "not valid JSON", None),
        (b"\x01\x02", "binary", None),
    ],
)
async def test_bad_first_frame_closes_4001(
    broker: Broker, first: object, reason: str, rid: object
) -> None:
    peer = await Peer.open(broker.url)
    await peer.send(first)  # type: ignore[arg-type]
    error = await peer.recv()
    assert error["op"] == "error" and error["code"] == "unauthorized"
    assert reason in error["message"]
    assert error.get("id") == rid
    with pytest.raises(ConnectionClosed):
        await peer.recv()
    assert peer.ws.close_code == 4001


async def test_auth_timeout(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker("--auth-timeout", "0.5")
    peer = await Peer.open(broker.url)
    error = await peer.recv(timeout=5)
    assert error["code"] == "unauthorized" and "timeout" in error["message"]
    with pytest.raises(ConnectionClosed):
        await peer.recv()
    assert peer.ws.close_code == 4001


# -- frames ----------------------------------------------------------------------------


async def test_malformed_frames_keep_the_connection(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    for bad in ["{", "[]", b"bin", '{"op":"nope","id":7}', '{"op":"sub","id":{},"topic":"a"}']:
        await peer.send(bad)
        error = await peer.recv()
        assert error["op"] == "error" and error["code"] == "bad_request", error
    assert error.get("id") is None  # an ill-typed id is not echoed
    await peer.send('{"op":"nope","id":7}')
    assert (await peer.recv())["id"] == 7
    reply = await peer.request("sub", topic="football")
    assert reply["op"] == "ok" and reply["recovered"] is True


async def test_errors_by_code(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("1", pub=["chat/#"], sub=["chat/#"]))
    cases = [
        ({"op": "pub", "topic": "a/+", "data": 1}, "bad_request"),
        ({"op": "sub", "topic": "a#"}, "bad_request"),
        ({"op": "pub", "topic": "news", "data": 1}, "forbidden"),
        ({"op": "pub", "topic": "$SYS/x", "data": 1}, "forbidden"),
        ({"op": "sub", "topic": "news"}, "forbidden"),
        ({"op": "sub", "topic": "user/2"}, "forbidden"),
        ({"op": "presence", "topic": "user/2"}, "forbidden"),
        ({"op": "presence", "topic": "chat/+"}, "bad_request"),
        ({"op": "stats"}, "forbidden"),
    ]
    for frame, code in cases:
        op = frame.pop("op")
        reply = await peer.request(str(op), **frame)
        assert (reply["op"], reply["code"]) == ("error", code), (op, frame, reply)
    # A pub without id that fails gets an error without id.
    await peer.send({"op": "pub", "topic": "news", "data": 1})
    error = await peer.recv()
    assert error["code"] == "forbidden" and "id" not in error


async def test_unsub_is_ok_without_subscription(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    assert (await peer.request("unsub", topic="never"))["op"] == "ok"


async def test_oversized_frame_closes_1009(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker("--max-message-size", "1KiB")
    peer = await Peer.open(broker.url, broker.token("1"))
    await peer.send({"op": "pub", "topic": "a", "data": "x" * 900, "id": 1})
    assert (await peer.recv())["op"] == "ok"
    await peer.send({"op": "pub", "topic": "a", "data": "x" * 2000, "id": 2})
    with pytest.raises(ConnectionClosed):
        await peer.recv()
    assert peer.ws.close_code == 1009


async def test_rate_limit(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker("--rate-limit", "5")
    peer = await Peer.open(broker.url, broker.token("1"))
    for i in range(20):
        await peer.send({"op": "pub", "topic": "a", "data": i, "id": i})
    replies = [await peer.recv() for _ in range(20)]
    codes = [r.get("code", "ok") for r in replies]
    assert 5 <= codes.count("ok") <= 7  # burst of one second's worth, then refill
    assert codes.count("rate_limited") == 20 - codes.count("ok")


# -- delivery --------------------------------------------------------------------------


async def test_fanout_many_subscribers_and_stamps(broker: Broker) -> None:
    subs = [await Peer.open(broker.url, broker.token(f"u{i}")) for i in range(50)]
    for s in subs:
        assert (await s.request("sub", topic="football"))["op"] == "ok"
    pub = await Peer.open(broker.url, broker.token("123", "John"))
    before = int(time.time() * 1000)
    ok = await pub.request("pub", topic="football", data={"score": "2-1"})
    for s in subs:
        msg = await s.recv()
        assert msg["op"] == "msg" and msg["topic"] == "football"
        assert msg["data"] == {"score": "2-1"} and msg["seq"] == ok["seq"]
        assert msg["from"] == {"id": "123", "name": "John"}
        assert before - 1000 <= msg["ts"] <= int(time.time() * 1000) + 1000


async def test_from_cannot_be_forged(broker: Broker) -> None:
    a = await Peer.open(broker.url, broker.token("a"))
    await a.request("sub", topic="t")
    b = await Peer.open(broker.url, broker.token("b", "Bee"))
    await b.send({"op": "pub", "topic": "t", "data": 1, "from": {"id": "a", "name": "x"}, "ts": 1})
    msg = await a.recv()
    assert msg["from"] == {"id": "b", "name": "Bee"} and msg["ts"] > 1


async def test_sender_excluded_unless_echo(broker: Broker) -> None:
    me = await Peer.open(broker.url, broker.token("1"))
    other = await Peer.open(broker.url, broker.token("1"))  # same user, other connection
    for p in (me, other):
        await p.request("sub", topic="room")
    await me.request("pub", topic="room", data="quiet")
    assert (await other.recv())["data"] == "quiet"
    await me.expect_nothing()
    await me.send({"op": "pub", "topic": "room", "data": "loud", "echo": True, "id": 50})
    frames = [await me.recv(), await me.recv()]
    assert {f["op"] for f in frames} == {"ok", "msg"}
    assert next(f for f in frames if f["op"] == "msg")["data"] == "loud"


async def test_one_delivery_per_connection(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    for pattern in ["a/b", "a/+", "a/#", "#", "+/b"]:
        await peer.request("sub", topic=pattern)
    again = await peer.request("sub", topic="a/+")  # replaces, never duplicates
    assert again["op"] == "ok"
    pub = await Peer.open(broker.url, broker.token("2"))
    await pub.request("pub", topic="a/b", data=1)
    await pub.request("pub", topic="a/b", data=2)
    assert [(await peer.recv())["data"] for _ in range(2)] == [1, 2]
    await peer.expect_nothing()
    await peer.request("unsub", topic="#")
    await pub.request("pub", topic="a/b", data=3)
    assert (await peer.recv())["data"] == 3
    await peer.expect_nothing()


async def test_patterns_and_dollar_topics(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    await peer.request("sub", topic="scores/+")
    pub = await Peer.open(broker.url, broker.token("2"))
    for topic in ["scores/uk/premier", "scores", "scores/uk"]:
        await pub.request("pub", topic=topic, data=topic)
    assert (await peer.recv())["topic"] == "scores/uk"
    await peer.expect_nothing()


async def test_inbox_privacy(broker: Broker) -> None:
    alice = await Peer.open(broker.url, broker.token("alice"))
    eve = await Peer.open(broker.url, broker.token("eve"))
    assert (await alice.request("sub", topic="user/alice"))["op"] == "ok"
    for pattern in ["user/+", "#", "user/#", "+/alice"]:
        assert (await eve.request("sub", topic=pattern))["op"] == "ok"
    assert (await eve.request("sub", topic="user/alice"))["code"] == "forbidden"
    assert (await eve.request("sub", topic="user/alice/#"))["code"] == "forbidden"
    bob = await Peer.open(broker.url, broker.token("bob"))
    ok = await bob.request("pub", topic="user/alice", data="hi alice")
    msg = await alice.recv()
    assert msg["data"] == "hi alice" and msg["from"]["id"] == "bob"
    await bob.request("pub", topic="user/eve", data="hi eve")
    got = await eve.recv()
    assert got["topic"] == "user/eve"  # her own inbox through her patterns, once
    await eve.expect_nothing()
    # Nor in replay.
    late = await Peer.open(broker.url, broker.token("eve"))
    await late.request("sub", topic="#", since=0)
    replayed = [await late.recv() for _ in range(1)]
    assert [m["topic"] for m in replayed] == ["user/eve"] and ok["seq"] < replayed[0]["seq"]
    await late.expect_nothing()


async def test_acl_enforced(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("1", pub=["scores/#"], sub=["scores/#"]))
    assert (await peer.request("sub", topic="scores/+"))["op"] == "ok"
    assert (await peer.request("sub", topic="#"))["code"] == "forbidden"
    assert (await peer.request("sub", topic="user/1/#"))["op"] == "ok"  # own inbox always
    assert (await peer.request("pub", topic="scores/uk", data=1, echo=True))["op"] == "ok"
    assert (await peer.request("pub", topic="news", data=1))["code"] == "forbidden"
    narrow = await Peer.open(broker.url, broker.token("2", sub=["scores/+"]))
    assert (await narrow.request("sub", topic="scores/#"))["code"] == "forbidden"
    nothing = await Peer.open(broker.url, broker.token("3", pub=[], sub=[]))
    assert (await nothing.request("pub", topic="a", data=1))["code"] == "forbidden"
    assert (await nothing.request("sub", topic="a"))["code"] == "forbidden"


async def test_stats_for_admin(broker: Broker) -> None:
    admin = await Peer.open(broker.url, broker.token("root", admin=True))
    await admin.request("sub", topic="x")
    await admin.request("pub", topic="x", data=1)
    stats = await admin.request("stats")
    assert stats["op"] == "ok"
    assert stats["connections"] == 1 and stats["subscriptions"] == 1
    assert stats["messages_in"] == 1 and stats["last_seq"] == 1


# -- presence --------------------------------------------------------------------------


async def test_presence_and_join_leave(broker: Broker) -> None:
    watcher = await Peer.open(broker.url, broker.token("w", "Watcher"))
    await watcher.request("sub", topic="room", presence=True)
    a1 = await Peer.open(broker.url, broker.token("a", "Ann"))
    await a1.request("sub", topic="room")
    assert await watcher.recv() == {
        "op": "join",
        "topic": "room",
        "user": {"id": "a", "name": "Ann"},
    }
    a2 = await Peer.open(broker.url, broker.token("a", "Ann"))
    await a2.request("sub", topic="room")
    await a2.request("sub", topic="roo+")  # a pattern... invalid, ignored for presence
    p = await Peer.open(broker.url, broker.token("p"))
    await p.request("sub", topic="+")  # pattern subscriptions do not count
    await watcher.expect_nothing()  # second connection of the same user: no join
    reply = await watcher.request("presence", topic="room")
    assert reply["users"] == [
        {"id": "a", "name": "Ann", "connections": 2},
        {"id": "w", "name": "Watcher", "connections": 1},
    ]
    await a1.close()
    await watcher.expect_nothing()
    await a2.request("unsub", topic="room")
    assert await watcher.recv() == {
        "op": "leave",
        "topic": "room",
        "user": {"id": "a", "name": "Ann"},
    }
    # A connection is not told of its own user's join.
    w2 = await Peer.open(broker.url, broker.token("w"))
    await w2.request("sub", topic="room")
    await watcher.expect_nothing()


async def test_healthz_and_404(broker: Broker) -> None:
    import urllib.error
    import urllib.request

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(broker.http_url + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    assert await asyncio.to_thread(get, "/healthz") == (200, b"ok")
    assert (await asyncio.to_thread(get, "/nope"))[0] == 404
