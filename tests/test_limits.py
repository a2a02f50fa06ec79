"""Limits that keep one client from exhausting or blinding the broker, against real
brokers on loopback.

Every connection holds at most ``--max-subscriptions``; a limit reached is counted in
/metrics and logged once, then summarised; values from clients are cut and escaped in the logs;
odd values get clear answers instead of tracebacks; the publish rate limit refills.
Connections and sockets (admission) are in test_admission.py.
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
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .harness import Broker
from .support import (
    ROOT,
    SECRET,
    Peer,
    free_port,
    isolated_env,
    limit_hits,
    log_events,
    metrics,
)

BrokerFactory = Callable[..., Broker]

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
