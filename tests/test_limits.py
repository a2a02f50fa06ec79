"""Limits that keep one client from exhausting or blinding the broker, against real
brokers on loopback.

Sockets are counted from accept against a cap derived from the file-descriptor limit;
unauthenticated connections have their own bound, per-address cap and deadline; every
connection holds at most ``--max-subscriptions``; a limit reached is counted in /metrics
and logged once, then summarised; values from clients are cut and escaped in the logs;
odd values get clear answers instead of tracebacks; the publish rate limit refills.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from .harness import Broker
from .support import ROOT, SECRET, BrokerProcess, Peer, free_port, isolated_env

BrokerFactory = Callable[..., Broker]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def metrics(broker: Broker) -> Samples:
    with urllib.request.urlopen(broker.http_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def limit_hits(broker: Broker, limit: str) -> float:
    return metrics(broker)[("broker_limit_hits_total", frozenset({("limit", limit)}))]


def log_events(broker: Broker, event: str) -> list[dict[str, Any]]:
    entries = []
    for line in broker.log().splitlines():
        if line.startswith("{"):
            entry = orjson.loads(line)
            if entry.get("event") == event:
                entries.append(entry)
    return entries


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


# -- subscriptions, counters ------------------------------------------------------------------


async def test_subscriptions_are_capped_by_default(make_broker: BrokerFactory) -> None:
    broker = make_broker("--log-format", "json", memory=True)
    peer = await Peer.open(broker.url, broker.token("many"))
    for n in range(1000):
        await peer.send({"op": "sub", "id": n, "topic": f"t/{n}"})
    oks = 0
    while oks < 1000:
        reply = await peer.recv(timeout=20)
        assert reply["op"] == "ok", reply
        oks += 1
    for n in range(3):
        refused = await peer.request("sub", topic=f"over/{n}")
        assert refused["code"] == "forbidden" and "limit" in refused["message"]
    # Re-subscribing to a held pattern is still fine at the cap.
    assert (await peer.request("sub", topic="t/7"))["op"] == "ok"
    samples = metrics(broker)
    assert samples[("broker_topics", frozenset())] == 1000
    assert samples[("broker_subscriptions", frozenset())] == 1000
    assert limit_hits(broker, "subscriptions") == 3
    await peer.close()
    deadline = time.monotonic() + 10
    while metrics(broker)[("broker_topics", frozenset())] != 0:
        assert time.monotonic() < deadline, "the closed connection's topics are still counted"
        await asyncio.sleep(0.05)
    assert await asyncio.to_thread(broker.stop) == 0
    reached = [e for e in log_events(broker, "limit_reached") if e["limit"] == "subscriptions"]
    assert len(reached) == 1


# -- logs, close reasons --------------------------------------------------------------------


def forged(alg: str) -> str:
    """A token whose header names ``alg`` (not signed with anything the broker knows)."""

    def part(obj: dict[str, Any]) -> str:
        raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': alg, 'typ': 'JWT'})}.{part({'sub': 'mallory'})}.c2ln"


async def test_huge_non_ascii_alg_is_refused_cleanly_and_logged_briefly(
    make_broker: BrokerFactory,
) -> None:
    broker = make_broker("--log-format", "json", memory=True)
    token = forged("\u00e9\n" * 6_000)  # under the 64 KiB frame limit, base64 and all
    for _ in range(40):
        peer = await Peer.open(broker.url)
        await peer.send({"op": "auth", "token": token})
        error = await peer.recv()
        assert error["code"] == "unauthorized" and "invalid algorithm" in error["message"]
        with pytest.raises(ConnectionClosed):
            await peer.recv()
        # The reason, cut to fit a close frame by bytes, not characters.
        assert peer.ws.close_code == 4001
        assert len((peer.ws.close_reason or "").encode()) <= 123
    header = forged("\u00e9" * 1_000)
    with pytest.raises(InvalidStatus) as refused:
        await connect(broker.url, additional_headers={"Authorization": f"Bearer {header}"})
    assert refused.value.response.status_code == 401
    assert await asyncio.to_thread(broker.stop) == 0
    log = broker.log()
    assert "Traceback" not in log
    assert len(log.encode()) < 32 * 1024, len(log.encode())
    refused_lines = log_events(broker, "refused")
    assert 1 <= len(refused_lines) <= 10
    assert all(len(json.dumps(e).encode()) < 1024 for e in refused_lines)
    assert all("\n" not in e["msg"] for e in refused_lines)
    [summary] = [e for e in log_events(broker, "repeated") if e["key"] == "unauthorized"]
    assert summary["count"] == 41 - len(refused_lines)


# -- odd values ----------------------------------------------------------------------------------


async def test_exp_beyond_a_float_is_unauthorized(broker: Broker) -> None:
    token = jwt.encode({"sub": "u", "exp": 10**400}, SECRET, algorithm="HS256")
    with pytest.raises(InvalidStatus) as refused:
        await connect(broker.url, additional_headers={"Authorization": f"Bearer {token}"})
    assert refused.value.response.status_code == 401
    peer = await Peer.open(broker.url)
    await peer.send({"op": "auth", "token": token})
    error = await peer.recv()
    assert error["code"] == "unauthorized" and "exp" in error["message"]


async def test_counts_beyond_int64_are_bad_request(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("u"))
    for field in ("last", "since"):
        for value in (2**63, 2**64 - 1):
            reply = await peer.request("sub", topic="t", **{field: value})
            assert reply["code"] == "bad_request", reply
    assert (await peer.request("sub", topic="t", since=2**63 - 1))["op"] == "ok"


async def test_integers_beyond_64_bits_are_refused_not_rounded(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("u"))
    await peer.request("sub", topic="n")
    for big in (2**64, -(2**63) - 1, 10**30):
        raw = f'{{"op":"pub","id":1,"topic":"n","data":{{"v":[{big}]}}}}'
        await peer.send(raw)
        reply = await peer.recv()
        assert reply["code"] == "bad_request" and "64 bits" in reply["message"], reply
    # The widest integers that fit go through exactly, and long digit strings are fine.
    for exact in (2**64 - 1, -(2**63)):
        await peer.send(f'{{"op":"pub","id":2,"topic":"n","data":{exact},"echo":true}}')
        assert (await peer.recv())["op"] == "ok"
        raw_msg = await asyncio.wait_for(peer.ws.recv(), 5)
        assert f'"data":{exact},'.encode() in (
            raw_msg if isinstance(raw_msg, bytes) else raw_msg.encode()
        )
    assert (await peer.request("pub", topic="x", data="1" * 40))["op"] == "ok"


async def test_presence_name_follows_a_refresh(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("u1", "Old Name"))
    assert (await peer.request("sub", topic="room"))["op"] == "ok"
    refreshed = await peer.request("auth", token=broker.token("u1", "New Name"))
    assert refreshed["op"] == "ok"
    users = (await peer.request("presence", topic="room"))["users"]
    assert [(u["id"], u["name"]) for u in users] == [("u1", "New Name")]


@pytest.mark.slow
def test_port_0_logs_the_port_it_got(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "broker.cli", "serve", "--port", "0", "--memory"]
    cmd += ["--secret", SECRET, "--log-format", "json"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=isolated_env(tmp_path), stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if '"listening"' in line:
                break
        entry = json.loads(line)
        url = entry["msg"].split(" listening on ")[1].split(" ")[0]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert port != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--retention", "inf", "--memory"], "not a finite duration"),
        (["serve", "--redis", "notaurl"], "not a Redis URL"),
        (["serve", "--data", "/proc/broker-test/x"], "cannot create data directory"),
        (
            ["serve", "--algorithm", "RS256", "--public-key", "{not_pem}", "--memory"],
            "is not a PEM public key",
        ),
        (["token", "--id", "u", "--ttl", "inf"], "not a finite duration"),
    ],
)
@pytest.mark.slow
def test_bad_values_are_refused_at_start_with_one_clear_line(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    not_pem = tmp_path / "key.txt"
    not_pem.write_text("this is not a key\n")
    args = [a.replace("{not_pem}", str(not_pem)) for a in args]
    if args[0] == "serve":
        args += ["--port", str(free_port()), "--secret", SECRET]
    else:
        args += ["--secret", SECRET]
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=ROOT,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# -- rate limit and subscription caps ------------------------------------------------


@pytest.mark.slow
async def test_rate_limit_bucket_refills(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker("--rate-limit", "5", memory=True)
    peer = await Peer.open(broker.url, broker.token("1"))

    async def burst(n: int, start: int) -> list[str]:
        for i in range(start, start + n):
            await peer.send({"op": "pub", "topic": "a", "data": i, "id": i})
        # Refusals are immediate, oks wait for the commit: order by id.
        replies = sorted([await peer.recv() for _ in range(n)], key=lambda r: r["id"])
        assert [r["id"] for r in replies] == list(range(start, start + n))
        return [r.get("code", r["op"]) for r in replies]

    first = await burst(10, 0)
    assert first[:5] == ["ok"] * 5 and first[-3:] == ["rate_limited"] * 3, first
    await asyncio.sleep(1.1)  # one second refills the whole bucket (burst = 5)
    again = await burst(6, 100)
    assert again[:5] == ["ok"] * 5 and again[5] == "rate_limited", again
    # A limited pub without id gets an error without id; the connection stays usable.
    await peer.send({"op": "pub", "topic": "a", "data": "no id"})
    error = await peer.recv()
    assert error["code"] == "rate_limited" and "id" not in error
    assert (await peer.request("sub", topic="a"))["op"] == "ok"
    # The bucket is per connection: another connection of the same user has its own.
    other = await Peer.open(broker.url, broker.token("1"))
    assert (await other.request("pub", topic="a", data="x"))["op"] == "ok"


async def test_max_subscriptions(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker("--max-subscriptions", "3", memory=True)
    peer = await Peer.open(broker.url, broker.token("1"))
    for pattern in ["a", "b/+", "c/#"]:
        assert (await peer.request("sub", topic=pattern))["op"] == "ok"
    refused = await peer.request("sub", topic="d")
    assert refused["op"] == "error" and refused["code"] == "forbidden", refused
    # Subscribing again to a pattern the connection has replaces it: still fine at the cap.
    assert (await peer.request("sub", topic="b/+"))["op"] == "ok"
    assert (await peer.request("sub", topic="a", last=5))["op"] == "ok"
    # The refused one really is absent and the others work.
    pub = await Peer.open(broker.url, broker.token("2"))
    for topic in ["d", "a", "b/x", "c/y/z"]:
        await pub.request("pub", topic=topic, data=topic)
    assert [(await peer.recv())["data"] for _ in range(3)] == ["a", "b/x", "c/y/z"]
    await peer.expect_nothing()
    # Dropping one frees a place.
    assert (await peer.request("unsub", topic="a"))["op"] == "ok"
    assert (await peer.request("sub", topic="d"))["op"] == "ok"
    assert (await peer.request("sub", topic="e"))["code"] == "forbidden"
    # The cap is per connection.
    other = await Peer.open(broker.url, broker.token("1"))
    for pattern in ["x", "y", "z"]:
        assert (await other.request("sub", topic=pattern))["op"] == "ok"
