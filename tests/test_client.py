"""The asyncio client library against real broker processes (and, for exact wire-level
reconnect behaviour, a few scripted WebSocket peers)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from broker.client import Client, Gap, Message, PresenceEvent, User
from broker.core.auth import mint_token
from broker.errors import (
    BadRequest,
    ConnectionFailed,
    ConnectionLost,
    Forbidden,
    RequestTimeout,
    TokenExpired,
    Unauthorized,
    Unavailable,
)

from .harness import Broker
from .support import SECRET, async_wait_for, free_port


def tok(user: str = "alice", name: str | None = None, **kw: Any) -> str:
    return mint_token(SECRET, user, name, **kw)


async def collect(client: Client, n: int, timeout: float = 5.0) -> list[Message]:
    out: list[Message] = []
    while len(out) < n:
        out.append(await client.next_message(timeout))
    return out


# -- basics ----------------------------------------------------------------------------


async def test_hello_user_and_server(broker: Broker) -> None:
    async with Client(broker.url, tok("42", "John")) as c:
        assert c.user == User("42", "John")
        assert c.server is not None and c.server.startswith("broker/")
        assert c.connected


async def test_bearer_header_auth(broker: Broker) -> None:
    async with Client(broker.url, tok("bob"), auth_header=True) as c:
        assert c.user == User("bob", "bob")
        assert await c.publish("t", 1) is not None


async def test_publish_subscribe_fields(broker: Broker) -> None:
    async with (
        Client(broker.url, tok("alice", "Alice")) as pub,
        Client(broker.url, tok("bob")) as sub,
    ):
        s = await sub.subscribe("scores/+")
        assert s.recovered is True and s.epoch
        values: list[Any] = ["2-1", {"home": 2, "away": 1}, [1, 2], 3.5, None, True]
        seqs = [await pub.publish("scores/uk", v) for v in values]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        got = await collect(sub, len(values))
        assert [m.data for m in got] == values
        assert [m.seq for m in got] == seqs
        assert all(m.topic == "scores/uk" and m.sender == User("alice", "Alice") for m in got)
        assert abs(got[0].ts / 1000 - time.time()) < 10
        assert got[0].to_json()["from"] == {"id": "alice", "name": "Alice"}
        # Not matching the pattern: not delivered.
        await pub.publish("scores/uk/premier", "deeper")
        with pytest.raises(RequestTimeout):
            await sub.next_message(0.3)


async def test_pipelined_publishes_matched_by_id(broker: Broker) -> None:
    async with (
        Client(broker.url, tok("alice")) as pub,
        Client(broker.url, tok("bob")) as sub,
    ):
        await sub.subscribe("pipe")
        seqs = await asyncio.gather(*(pub.publish("pipe", i) for i in range(500)))
        got = await collect(sub, 500)
        by_seq = {m.seq: m.data for m in got}
        # Each publish got the seq the broker gave to *its* message.
        assert all(by_seq[seq] == i for i, seq in enumerate(seqs))
        assert len(set(seqs)) == 500


async def test_publish_without_ack_and_echo(broker: Broker) -> None:
    async with Client(broker.url, tok("alice")) as c:
        await c.subscribe("room")
        assert isinstance(await c.publish("room", "not echoed"), int)
        assert await c.publish("room", "silent", ack=False) is None
        seq = await c.publish("room", "echoed", echo=True)
        msg = await c.next_message(3)
        # Only the echo=True message comes back to its own connection.
        assert (msg.data, msg.seq) == ("echoed", seq)


async def test_typed_errors(broker: Broker) -> None:
    limited = tok("carol", pub=["scores/#"], sub=["scores/#"])
    async with Client(broker.url, tok("alice")) as c, Client(broker.url, limited) as lc:
        with pytest.raises(Forbidden) as info:
            await c.publish("$sys/x", 1)
        assert info.value.request_id is not None and "reserved" in info.value.message
        with pytest.raises(Forbidden):
            await c.subscribe("user/bob")
        assert "user/bob" not in c.subscriptions
        with pytest.raises(Forbidden):
            await c.stats()
        with pytest.raises(BadRequest):  # the broker refuses presence on a pattern
            await c.presence("scores/+")
        with pytest.raises(BadRequest):  # checked before sending
            await c.publish("a/+", 1)
        with pytest.raises(Forbidden):
            await lc.publish("chat", 1)
        with pytest.raises(Forbidden):
            await lc.subscribe("#")
        assert await lc.publish("scores/uk", 1) is not None
        # The connection survives refusals.
        assert await c.publish("ok", 1) is not None


async def test_stats_needs_admin(broker: Broker) -> None:
    async with Client(broker.url, tok("root", admin=True)) as c:
        figures = await c.stats()
        assert "op" not in figures and "id" not in figures
        assert figures["connections"] >= 1


async def test_presence_and_join_leave(broker: Broker) -> None:
    async with Client(broker.url, tok("ann", "Ann")) as ann:
        await ann.subscribe("lobby", presence=True)
        async with Client(broker.url, tok("ben", "Ben")) as ben:
            await ben.subscribe("lobby")
            users = await ann.presence("lobby")
            assert sorted((u.id, u.name, u.connections) for u in users) == [
                ("ann", "Ann", 1),
                ("ben", "Ben", 1),
            ]
            events = ann.events()
            event = await asyncio.wait_for(anext(events), 3)
            assert event == PresenceEvent("join", "lobby", User("ben", "Ben"))
        event = await asyncio.wait_for(anext(events), 3)
        assert event == PresenceEvent("leave", "lobby", User("ben", "Ben"))


async def test_last_and_since(broker: Broker) -> None:
    async with Client(broker.url, tok("alice")) as pub:
        seqs = [await pub.publish(f"h/{i % 2}", i) for i in range(6)]
    async with Client(broker.url, tok("bob")) as c:
        s = await c.subscribe("h/#", last=3)
        assert s.seq >= seqs[-1]
        assert [m.data for m in await collect(c, 3)] == [3, 4, 5]
    async with Client(broker.url, tok("bob")) as c:
        s = await c.subscribe("h/#", since=seqs[3], epoch=s.epoch)
        assert s.recovered is True
        assert [m.data for m in await collect(c, 2)] == [4, 5]
    async with Client(broker.url, tok("bob")) as c:
        s = await c.subscribe("h/#", since=seqs[3], epoch="another-history")
        assert s.recovered is False  # so the broker replays all it holds
        assert [m.data for m in await collect(c, 6)] == [0, 1, 2, 3, 4, 5]


async def test_iteration_ends_on_close(broker: Broker) -> None:
    c = Client(broker.url, tok())
    await c.connect()
    await c.subscribe("x")

    async def consume() -> list[Message]:
        return [m async for m in c]

    task = asyncio.create_task(consume())
    for _ in range(3):  # a few loop turns: the consumer is now waiting in the iterator
        await asyncio.sleep(0)
    await c.close()
    assert await asyncio.wait_for(task, 3) == []
    with pytest.raises(ConnectionLost):
        await c.publish("x", 1)


# -- connecting and authentication --------------------------------------------------------


async def test_unreachable_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        async with Client(f"ws://127.0.0.1:{free_port()}/ws", tok()):
            pass
    assert time.monotonic() - started < 3
    assert "cannot connect" in info.value.message


async def test_url_list_tried_in_turn(broker: Broker) -> None:
    dead = f"ws://127.0.0.1:{free_port()}/ws"
    async with Client([dead, broker.url], tok()) as c:
        assert c.url == broker.url


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Client("http://example.com/ws", tok())
    with pytest.raises(ValueError):
        Client("ws://127.0.0.1:1/ws")  # neither token nor provider


@pytest.mark.parametrize("header", [False, True])
async def test_refused_tokens(broker: Broker, header: bool) -> None:
    with pytest.raises(Unauthorized) as info:
        await Client(
            broker.url,
            mint_token("another-secret-of-enough-length!!", "a"),
            auth_header=header,
        ).connect()
    assert "signature" in info.value.message
    with pytest.raises(TokenExpired):
        await Client(broker.url, tok(ttl=-10), auth_header=header).connect()


@pytest.mark.slow
async def test_expiry_without_provider_is_final(broker: Broker) -> None:
    async with Client(broker.url, tok(ttl=2), backoff_initial=0.01) as c:
        await c.subscribe("x")
        with pytest.raises(TokenExpired):
            async for _ in c:
                pass
        assert c.reconnects == 0
        with pytest.raises(TokenExpired):
            await c.publish("x", 1)


@pytest.mark.slow
async def test_token_provider_refreshes_in_place(broker: Broker) -> None:
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        return tok("alice", ttl=2)

    async with (
        Client(broker.url, token_provider=provider) as c,
        Client(broker.url, tok("bob")) as pub,
    ):
        await c.subscribe("x")
        await asyncio.sleep(2.8)  # real time past the first token's exp (the broker's clock)
        await pub.publish("x", "still here")
        msg = await c.next_message(2)
        assert msg.data == "still here"
        assert calls >= 2
        assert c.reconnects == 0  # refreshed on the live connection, no 4003


@pytest.mark.slow
async def test_expiry_with_provider_reconnects_and_resumes(
    broker: Broker,
) -> None:
    # refresh_at > 1: no refresh before exp, so the broker closes with 4003; the client
    # reconnects with a fresh token from the provider and resumes its subscription.
    async with (
        Client(
            broker.url,
            token_provider=lambda: tok("alice", ttl=2),
            refresh_at=5,
            backoff_initial=0.01,
        ) as c,
        Client(broker.url, tok("bob")) as pub,
    ):
        await c.subscribe("x")
        await pub.publish("x", "before")
        async with asyncio.timeout(5):
            while c.reconnects == 0:  # wait for the 4003 and the reconnect
                await asyncio.sleep(0.05)
        await pub.publish("x", "after")
        assert [m.data for m in await collect(c, 2)] == ["before", "after"]


@pytest.mark.slow
async def test_refused_provider_token_stops_reconnecting(broker: Broker) -> None:
    tokens = iter([tok("alice", ttl=2)])

    def provider() -> str:
        # The first token is fine; the refresh comes from the wrong key.
        return next(tokens, mint_token("wrong-secret-wrong-secret-wrong!!", "alice"))

    async with Client(broker.url, token_provider=provider, backoff_initial=0.01) as c:
        await c.subscribe("x")
        with pytest.raises(Unauthorized):
            await asyncio.wait_for(anext(c.messages()), 5)


# -- reconnect and resume against a real broker -------------------------------------------


async def test_no_loss_no_duplicates_across_restart(broker: Broker) -> None:
    received: list[Message] = []
    acked: list[int] = []
    states: list[str] = []
    async with (
        Client(broker.url, tok("pub")) as pub,
        Client(broker.url, tok("sub"), on_state=states.append, backoff_initial=0.05) as sub,
    ):
        await sub.subscribe("stream")
        stop = asyncio.Event()

        async def publisher() -> None:
            i = 0
            while not stop.is_set():
                try:
                    acked.append(await pub.publish("stream", i))
                except (ConnectionLost, Unavailable, OSError):
                    await asyncio.sleep(0.02)  # unknown outcome or broker away: go on
                i += 1
                await asyncio.sleep(0.003)  # a steady stream, not a flood

        async def consumer() -> None:
            async for msg in sub:
                received.append(msg)

        tasks = [asyncio.create_task(publisher()), asyncio.create_task(consumer())]
        await async_wait_for(lambda: len(acked) > 20, 10)  # the stream runs
        before = len(acked)
        await asyncio.to_thread(broker.restart)
        await async_wait_for(lambda: len(acked) > before + 20, 15)  # and runs again
        stop.set()
        await tasks[0]
        deadline = time.monotonic() + 5
        while not set(acked) <= {m.seq for m in received} and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        tasks[1].cancel()
    seqs = [m.seq for m in received]
    assert before > 10 and len(acked) > before + 10  # the stream ran on both sides
    assert sub.reconnects >= 1 and "disconnected" in states
    assert len(seqs) == len(set(seqs)), "duplicates"
    assert seqs == sorted(seqs), "out of order"
    assert set(acked) <= set(seqs), f"lost {sorted(set(acked) - set(seqs))[:10]}"


@pytest.mark.timeout(30)
async def test_send_on_a_just_closed_connection_waits_for_the_next_one(
    broker: Broker,
) -> None:
    # The CI failure of 2026-11-24: a publish that found its connection closed
    # before the session task had noticed retried on the same dead socket in a
    # loop that never yielded, so the client never reconnected.
    async with Client(broker.url, tok("pub"), backoff_initial=0.05) as pub:
        dead = pub._ws
        assert dead is not None
        dead.transport.abort()
        # One turn: the socket's connection_lost runs (the connection is now
        # CLOSED) but the session task that reads it has not resumed yet.
        await asyncio.sleep(0)
        seq = await pub.publish("t", "after")
        assert isinstance(seq, int) and pub._ws is not dead and pub.reconnects == 1


@pytest.mark.slow
async def test_a_consumer_that_falls_behind_is_bounded_and_loses_nothing(
    make_broker: Any,
) -> None:
    broker = make_broker("--max-queue", "64KiB", "--history", "10000")
    async with (
        Client(broker.url, tok("slow"), max_buffered=50, backoff_initial=0.05) as sub,
        Client(broker.url, tok("pub")) as pub,
    ):
        await sub.subscribe("flood")
        payload, n = "x" * 8000, 2500
        seqs: list[int] = []
        for start in range(0, n, 100):
            batch = range(start, min(start + 100, n))
            seqs += await asyncio.gather(
                *(pub.publish("flood", {"i": i, "pad": payload}) for i in batch)
            )
        # Nobody reads: the client stopped reading at its bound instead of growing. Time
        # passes on purpose: an unbounded buffer would fill up within it.
        await asyncio.sleep(0.5)
        assert sub.buffered <= 50
        got = await collect(sub, n, timeout=60)
    assert [m.data["i"] for m in got] == list(range(n))
    assert [m.seq for m in got] == seqs
    # 20 MB could not wait in socket buffers and a 64 KiB server queue: the broker cut
    # the stalled connection (4008) and the client resumed it from history.
    assert sub.reconnects >= 1


async def test_memory_broker_restart_reports_gap_and_keeps_delivering(
    make_broker: Any,
) -> None:
    broker = make_broker(memory=True)
    gaps: list[Gap] = []
    async with Client(broker.url, tok("sub"), on_gap=gaps.append, backoff_initial=0.05) as sub:
        await sub.subscribe("m")
        async with Client(broker.url, tok("pub")) as pub:
            for i in range(3):
                await pub.publish("m", i)
        assert [m.data for m in await collect(sub, 3)] == [0, 1, 2]
        old_epoch = sub.epoch
        await asyncio.to_thread(broker.restart)  # history starts over: seqs restart at 1
        await sub.wait_connected(5)
        for _ in range(50):
            if gaps:
                break
            await asyncio.sleep(0.05)
        assert len(gaps) == 1 and gaps[0].epoch_changed and gaps[0].epoch == old_epoch
        async with Client(broker.url, tok("pub")) as pub:
            for i in range(3):
                await pub.publish("m", f"new {i}")
        # New seqs collide with old ones; they must not be dropped as duplicates.
        assert [m.data for m in await collect(sub, 3)] == ["new 0", "new 1", "new 2"]


# -- exact wire behaviour, with a scripted peer -------------------------------------------


Recv = Callable[[ServerConnection], Awaitable[dict[str, Any]]]
Script = Callable[[ServerConnection, int, Recv], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A WebSocket peer that answers ``auth`` with ``hello`` then runs ``script`` with the
    connection number and a ``recv`` that records every frame the client sends."""
    frames: list[dict[str, Any]] = []
    connections = 0

    async def recv(ws: ServerConnection) -> dict[str, Any]:
        frame = orjson.loads(await ws.recv())
        frames.append(frame)
        return frame

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        auth = orjson.loads(await ws.recv())
        assert auth["op"] == "auth"
        await ws.send(
            orjson.dumps(
                {"op": "hello", "user": {"id": "u", "name": "U"}, "server": "fake"}
            ).decode()
        )
        await script(ws, connections, recv)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws", frames


def msg(seq: int, topic: str = "t", data: Any = None) -> str:
    return orjson.dumps(
        {
            "op": "msg",
            "topic": topic,
            "seq": seq,
            "data": data if data is not None else seq,
            "from": {"id": "p", "name": "P"},
            "ts": 1,
        }
    ).decode()


async def test_inflight_publish_is_sent_again_with_its_key_and_sub_is_retried() -> None:
    async def script(ws: ServerConnection, n: int, recv: Recv) -> None:
        if n == 1:
            await recv(ws)  # the sub: no answer
            await recv(ws)  # the pub: drop the connection instead of answering
            await ws.close(1011)
            return
        frame = await recv(ws)  # the retried sub, on the new connection
        await ws.send(
            orjson.dumps(
                {
                    "op": "ok",
                    "id": frame["id"],
                    "seq": 7,
                    "epoch": "e1",
                    "recovered": True,
                }
            ).decode()
        )
        frame = await recv(ws)  # the pub again: the broker had recorded it
        answer = {"op": "ok", "id": frame["id"], "seq": 5, "duplicate": True}
        await ws.send(orjson.dumps(answer).decode())
        await ws.wait_closed()

    async with (
        scripted(script) as (url, frames),
        Client(url, tok(), backoff_initial=0.01) as c,
    ):
        sub_task = asyncio.create_task(c.subscribe("t"))
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(c.publish("t", "in flight"), 5) == 5
        sub = await asyncio.wait_for(sub_task, 3)
        assert (sub.seq, sub.epoch) == (7, "e1")
    assert [f["op"] for f in frames] == ["sub", "pub", "sub", "pub"]
    assert "since" not in frames[2]
    # The same publish, with the same key: the broker records it once.
    assert isinstance(frames[1]["key"], str) and frames[3]["key"] == frames[1]["key"]
    assert frames[3]["data"] == frames[1]["data"] == "in flight"


async def test_resume_sends_since_and_epoch_and_dedupes() -> None:
    async def script(ws: ServerConnection, n: int, recv: Recv) -> None:
        frame = await recv(ws)
        assert frame["op"] == "sub"
        if n == 1:
            await ws.send(
                orjson.dumps(
                    {
                        "op": "ok",
                        "id": frame["id"],
                        "seq": 10,
                        "epoch": "E",
                        "recovered": True,
                    }
                ).decode()
            )
            for seq in (11, 12, 12, 13):  # a duplicate on the wire is delivered once
                await ws.send(msg(seq))
            await ws.close(4008, "slow consumer")
            return
        # Resumed: replay overlapping what was delivered, then new ones.
        await ws.send(
            orjson.dumps(
                {
                    "op": "ok",
                    "id": frame["id"],
                    "seq": 15,
                    "epoch": "E",
                    "recovered": True,
                }
            ).decode()
        )
        for seq in (13, 14, 15):
            await ws.send(msg(seq))
        await ws.wait_closed()

    async with (
        scripted(script) as (url, frames),
        Client(url, tok(), backoff_initial=0.01) as c,
    ):
        await c.subscribe("t")
        got = [m.seq for m in await collect(c, 5, timeout=3)]
        assert c.reconnects == 1
    assert got == [11, 12, 13, 14, 15]
    assert frames[1]["since"] == 13 and frames[1]["epoch"] == "E" and frames[1]["topic"] == "t"


async def test_unrecovered_resume_is_reported() -> None:
    async def script(ws: ServerConnection, n: int, recv: Recv) -> None:
        frame = await recv(ws)
        recovered = n == 1
        await ws.send(
            orjson.dumps(
                {
                    "op": "ok",
                    "id": frame["id"],
                    "seq": 5,
                    "epoch": "E",
                    "recovered": recovered,
                }
            ).decode()
        )
        if n == 1:
            await ws.send(msg(5))
            await ws.close(1001)
            return
        await ws.wait_closed()

    gaps: list[Gap] = []
    async with (
        scripted(script) as (url, _frames),
        Client(url, tok(), backoff_initial=0.01, on_gap=gaps.append) as c,
    ):
        await c.subscribe("t")
        assert (await c.next_message(2)).seq == 5
        events = c.events()
        event = await asyncio.wait_for(anext(events), 3)
    assert isinstance(event, Gap) and event.since == 5 and not event.epoch_changed
    assert gaps == [event]
    assert "no longer" in event.describe()


async def test_no_reconnect_when_disabled() -> None:
    async def script(ws: ServerConnection, n: int, recv: Recv) -> None:
        await recv(ws)
        await ws.close(1001)

    async with (
        scripted(script) as (url, frames),
        Client(url, tok(), reconnect=False) as c,
    ):
        with pytest.raises(ConnectionLost):
            await c.subscribe("t")
        with pytest.raises(ConnectionLost):
            async for _ in c:
                pass
        assert c.reconnects == 0
    assert len(frames) == 1
