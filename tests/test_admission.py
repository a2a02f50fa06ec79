"""Admission against a real broker: the connection cap (``--max-connections``), sockets
counted from accept against a cap derived from the file-descriptor limit, and the
unauthenticated connections' own bound, per-address cap and deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from .harness import Broker
from .support import (
    BrokerProcess,
    Peer,
    limit_hits,
    log_events,
    metrics,
    refusal,
)

BrokerFactory = Callable[..., Broker]

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class LimitedBroker(BrokerProcess):
    """A broker started with a given RLIMIT_NOFILE (soft, hard)."""

    def __init__(self, home: Path, *args: str, nofile: tuple[int, int], **kw: Any) -> None:
        super().__init__(home, *args, **kw)
        self.nofile = nofile

    def command(self) -> list[str]:
        cmd = super().command()
        soft, hard = self.nofile
        boot = (
            "import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
            "sys.argv = ['broker'] + sys.argv[1:]; "
            "runpy.run_module('broker.cli', run_name='__main__', alter_sys=True)"
        )
        return [sys.executable, "-c", boot, *cmd[cmd.index("serve") :]]


async def open_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """``count`` TCP connections that never send a byte."""
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
    return writers


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()


async def test_max_connections(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker("--max-connections", "3", memory=True)
    token = broker.token("1")
    peers = [await Peer.open_with_header(broker.url, token) for _ in range(3)]
    for p in peers:
        assert (await p.recv())["op"] == "hello"
    status, body = await refusal(broker.url, {"Authorization": f"Bearer {token}"})
    assert status == 503 and body.strip()
    status, _ = await refusal(broker.url, {})  # without a token too
    assert status == 503
    await peers[0].close()
    deadline = time.monotonic() + 5
    while True:
        try:
            fresh = await Peer.open_with_header(broker.url, token)
            break
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            assert time.monotonic() < deadline, "a closed connection's slot was never freed"
            await asyncio.sleep(0.05)
    assert (await fresh.recv())["op"] == "hello"
    assert (await fresh.request("sub", topic="x"))["op"] == "ok"
    assert (await peers[1].request("sub", topic="x"))["op"] == "ok"


async def test_max_connections_under_a_burst(make_broker) -> None:  # type: ignore[no-untyped-def]
    """Twenty simultaneous upgrades against a cap of three: three get in."""
    broker = make_broker("--max-connections", "3", memory=True)
    token = broker.token("1")

    async def attempt() -> Any:
        try:
            ws = await connect(
                broker.url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
            )
        except InvalidStatus as exc:
            return exc.response.status_code
        with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError):
            await asyncio.wait_for(ws.recv(), 5)
        return ws

    results = await asyncio.gather(*(attempt() for _ in range(20)))
    opened = [r for r in results if not isinstance(r, int)]
    assert sorted(r for r in results if isinstance(r, int)) == [503] * (20 - len(opened))
    assert len(opened) == 3, f"{len(opened)} connections accepted with --max-connections 3"
    for ws in opened:
        await ws.close()


# -- sockets, unauthenticated connections ------------------------------------------------------


@pytest.mark.slow
async def test_idle_sockets_do_not_lock_clients_out(tmp_path: Path) -> None:
    """400 idle sockets at a 256-descriptor limit: the broker keeps serving, the soft
    limit was raised to the hard one, the limit is counted and logged once."""
    broker = LimitedBroker(
        tmp_path,
        "--log-format",
        "json",
        "--max-unauthenticated-per-address",
        "0",
        memory=True,
        nofile=(128, 256),
    ).start()
    try:
        idle = await open_idle(broker.port, 400)
        peer = await Peer.open_with_header(broker.url, broker.token("victim"))
        assert (await peer.recv())["op"] == "hello"
        assert (await peer.request("sub", topic="t"))["op"] == "ok"
        assert (await peer.request("pub", topic="t", data=1, echo=True))["op"] == "ok"
        assert (await peer.recv())["data"] == 1
        samples = metrics(broker)
        # 256 descriptors (the soft 128 raised to the hard limit) less 128 kept aside.
        assert samples[("broker_max_connections", frozenset())] == 128
        assert limit_hits(broker, "unauthenticated") > 300
        close_all(idle)
        await peer.close()
        assert await asyncio.to_thread(broker.stop) == 0
        reached = log_events(broker, "limit_reached")
        assert [e["limit"] for e in reached] == ["unauthenticated"], reached
        [summary] = [e for e in log_events(broker, "repeated") if e["key"] == "unauthenticated"]
        assert summary["count"] > 300 and "more refusals" in summary["msg"]
    finally:
        broker.kill()


async def test_sockets_count_from_accept(make_broker: BrokerFactory) -> None:
    """Two idle sockets fill --max-connections 2: the next handshake gets 503."""
    broker = make_broker("--max-connections", "2", memory=True)
    idle = await open_idle(broker.port, 2)
    with pytest.raises(InvalidStatus) as refused:
        await connect(broker.url, open_timeout=5)
    assert refused.value.response.status_code == 503
    close_all(idle)
    deadline = time.monotonic() + 10
    while True:  # the slots come back once the idle sockets are gone
        try:
            peer = await Peer.open(broker.url, broker.token("u"))
            break
        except (InvalidStatus, InvalidMessage, OSError):
            assert time.monotonic() < deadline, "the idle sockets' slots never came back"
            await asyncio.sleep(0.1)
    # The scrape is a connection too: the second of two.
    assert limit_hits(broker, "connections") >= 1
    await peer.close()


async def test_unauthenticated_connections_per_address(make_broker: BrokerFactory) -> None:
    """At --max-unauthenticated-per-address 3, three idle sockets from one address: a
    fourth connection from it gets in, and the oldest idle one is dropped for it."""
    broker = make_broker("--max-unauthenticated-per-address", "3", memory=True)
    early = await Peer.open(broker.url, broker.token("early"))
    readers = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        readers.append((reader, writer))
    late = await Peer.open_with_header(broker.url, broker.token("late"))
    assert (await late.recv())["op"] == "hello"
    # The first idle socket was dropped; the two others are still there.
    assert await asyncio.wait_for(readers[0][0].read(), 5) == b""
    for reader, _ in readers[1:]:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(), 0.2)
    # An authenticated connection is not affected.
    assert (await early.request("sub", topic="x"))["op"] == "ok"
    for _, writer in readers:
        writer.close()
    assert limit_hits(broker, "unauthenticated_per_address") >= 1
    await late.close()
    await early.close()


async def test_a_burst_of_honest_handshakes_from_one_address_gets_in(
    make_broker: BrokerFactory,
) -> None:
    """With the defaults, 200 clients of one address that connect at once and only then
    send their requests (as a load generator or a NAT's users after a restart do: the
    broker accepts the burst before it reads any request) all get in."""
    broker = make_broker(memory=True)
    count = 200
    streams = [await asyncio.open_connection("127.0.0.1", broker.port) for _ in range(count)]
    for n, (_, writer) in enumerate(streams):
        token = broker.token(f"u{n}").encode()
        writer.write(
            HANDSHAKE.replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer " + token + b"\r\n\r\n")
        )
    statuses = [await asyncio.wait_for(reader.readline(), 10) for reader, _ in streams]
    assert statuses == [b"HTTP/1.1 101 Switching Protocols\r\n"] * count
    assert limit_hits(broker, "unauthenticated_per_address") == 0
    close_all([writer for _, writer in streams])


@pytest.mark.slow
async def test_authentication_deadline_counts_from_accept(make_broker: BrokerFactory) -> None:
    """With --auth-timeout 2, a client that sends its request after 1.5 s and never
    authenticates is dropped 2 s after accept, not 2 s after its request."""
    broker = make_broker("--auth-timeout", "2", memory=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    accepted = time.monotonic()
    await asyncio.sleep(1.5)
    writer.write(HANDSHAKE)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    frames = b""
    while b"\x88" not in frames:  # the close frame (4001), after the error frame
        chunk = await asyncio.wait_for(reader.read(4096), 10)
        assert chunk, "closed without a close frame"
        frames += chunk
    closed_after = time.monotonic() - accepted
    assert closed_after < 3.0, f"refused {closed_after:.1f}s after accept"
    writer.close()
