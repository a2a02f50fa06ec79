"""Hardening (issue 6: authentication, limits and closing in docs/protocol.md) against real
broker processes.

Slow consumers, rate limit refill, connection and subscription caps, token expiry and
refresh, RS256/ES256 keys, forged tokens, wss, origin checks, fuzzing and graceful
shutdown. Everything runs on 127.0.0.1; keys and certificates are generated here.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import jwt
import orjson
import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.typing import Origin

from broker.errors import ERROR_CODES

from .support import ROOT, SECRET, BrokerProcess, Peer, isolated_env, self_signed_cert

SECRET_B = SECRET.encode()
AUD = "broker-tests"
ISS = "https://issuer.example"


# -- helpers ---------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(part: dict[str, Any] | bytes) -> str:
    raw = part if isinstance(part, bytes) else json.dumps(part, separators=(",", ":")).encode()
    return b64(raw)


def forge(
    header: dict[str, Any] | bytes,
    payload: dict[str, Any] | bytes,
    key: bytes = SECRET_B,
    digest: Any = hashlib.sha256,
) -> str:
    """A JWT with exactly this header and payload, HMAC-signed by hand with ``key``
    (PyJWT would refuse to build most of the tokens below)."""
    signing_input = segment(header) + "." + segment(payload)
    mac = hmac.new(key, signing_input.encode(), digest).digest()
    return signing_input + "." + b64(mac)


def alg_none(alg: str, payload: dict[str, Any]) -> str:
    return segment({"alg": alg, "typ": "JWT"}) + "." + segment(payload) + "."


async def refusal(url: str, headers: Headers | dict[str, str], **kw: Any) -> tuple[int, str]:
    """Status and body of a refused upgrade (fails if the upgrade succeeds)."""
    with pytest.raises(InvalidStatus) as info:
        ws = await connect(url, additional_headers=headers, open_timeout=5, **kw)
        await ws.close()
    response = info.value.response
    return response.status_code, bytes(response.body or b"").decode(errors="replace")


async def closed_with(
    peer: Peer, timeout: float = 5.0
) -> tuple[int | None, str | None, list[dict[str, Any]]]:
    """Read until the connection closes; the close code, reason and the frames seen."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ConnectionClosed):
        while True:
            frames.append(await peer.recv(timeout=max(0.01, deadline - time.monotonic())))
    return peer.ws.close_code, peer.ws.close_reason, frames


def http_get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, b""  # port closed


class RawClient:
    """A WebSocket client written by hand on a plain blocking socket: it completes the
    handshake (token in the Authorization header), can send masked text frames and parse
    what comes back, and otherwise never reads, like a consumer that stopped reading."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, port: int, token: str, *, rcvbuf: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            assert chunk, f"handshake cut short: {buf!r}"
            buf += chunk
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101"), lines[0]
        expected = base64.b64encode(hashlib.sha1(key + self.GUID).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
        assert headers["sec-websocket-accept"] == expected
        self.bytes_read = 0

    def send_json(self, obj: Any) -> None:
        payload = orjson.dumps(obj)
        mask = os.urandom(4)
        n = len(payload)
        header = (
            bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
        )
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            self.bytes_read += len(chunk)
            self.buf += chunk

    def recv_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame (server frames are unmasked)."""
        self._need(2)
        opcode, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
        offset = 2
        if n == 126:
            self._need(4)
            n, offset = int.from_bytes(self.buf[2:4], "big"), 4
        elif n == 127:
            self._need(10)
            n, offset = int.from_bytes(self.buf[2:10], "big"), 10
        self._need(offset + n)
        payload, self.buf = self.buf[offset : offset + n], self.buf[offset + n :]
        return opcode, payload

    def recv_json(self) -> dict[str, Any]:
        opcode, payload = self.recv_frame()
        assert opcode == 1, opcode
        return orjson.loads(payload)

    def drain_until_closed(self, timeout: float) -> tuple[bool, int | None]:
        """Read everything until EOF or reset: (closed, close code if a close frame came)."""
        self.sock.settimeout(timeout)
        code = None
        try:
            while True:
                opcode, payload = self.recv_frame()
                if opcode == 8:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        except (EOFError, ConnectionResetError, BrokenPipeError):
            return True, code
        except TimeoutError:
            return False, code

    def close(self) -> None:
        self.sock.close()


class RssMonitor:
    """Samples a process's RSS in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rsa_keypair(tmp: Path, name: str = "rsa") -> tuple[Any, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, write_public(tmp, name, key)


def ec_keypair(tmp: Path, name: str = "ec") -> tuple[Any, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, write_public(tmp, name, key)


def write_public(tmp: Path, name: str, key: Any) -> Path:
    path = tmp / f"{name}.pub.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def private_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def started(home: Path, *args: str, **kw: Any) -> BrokerProcess:
    return BrokerProcess(home, *args, **kw).start()


# -- slow consumers --------------------------------------------------------------------


async def test_slow_consumers_are_closed_and_others_keep_pace(make_broker) -> None:  # type: ignore[no-untyped-def]
    """Ten raw clients that never read; 30 MB published in 30 KB messages, acked."""
    broker = make_broker("--history", "20", memory=True)  # --max-queue: the 1 MiB default
    token = broker.token("slow")
    raws = [RawClient(broker.port, token, rcvbuf=4096) for _ in range(10)]
    for raw in raws:
        assert raw.recv_json()["op"] == "hello"
        raw.send_json({"op": "sub", "id": 1, "topic": "firehose"})
        reply = raw.recv_json()
        assert (reply["op"], reply["id"]) == ("ok", 1), reply
        # From here on these clients never read again.

    admin = await Peer.open(broker.url, broker.token("admin", admin=True))
    sub = await Peer.open(broker.url, broker.token("reader"))
    assert (await sub.request("sub", topic="firehose"))["op"] == "ok"
    pub = await Peer.open(broker.url, broker.token("writer", "Writer"))

    total, batch, pad = 1000, 16, "x" * 30_000  # 1000 x 30 KB = 30 MB
    received: list[dict[str, Any]] = []

    async def consume() -> None:
        while len(received) < total:
            frame = await sub.recv(timeout=30)
            received.append(frame)

    consumer = asyncio.create_task(consume())
    acked: list[int] = []
    started_at = time.monotonic()
    with RssMonitor(broker.proc.pid) as rss:
        for first in range(0, total, batch):
            ids = list(range(first, min(first + batch, total)))
            for i in ids:
                await pub.send(
                    {"op": "pub", "id": i, "topic": "firehose", "data": {"i": i, "pad": pad}}
                )
            for i in ids:
                reply = await pub.recv(timeout=30)
                assert (reply["op"], reply["id"]) == ("ok", i), reply
                acked.append(reply["seq"])
            # The normal subscriber keeps pace: it has everything published so far.
            deadline = time.monotonic() + 30
            while len(received) < len(acked) and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            assert len(received) == len(acked), "the normal subscriber fell behind"
            rss.sample()
        await asyncio.wait_for(consumer, 30)
    elapsed = time.monotonic() - started_at
    print(
        f"30 MB to 1 reader + 10 stuck clients in {elapsed:.1f}s, "
        f"server RSS peak {rss.peak / 2**20:.0f} MB"
    )

    assert [m["op"] for m in received] == ["msg"] * total
    assert [m["data"]["i"] for m in received] == list(range(total))
    assert [m["seq"] for m in received] == acked and acked == sorted(acked)
    assert all(m["from"] == {"id": "writer", "name": "Writer"} for m in received)
    assert rss.peak < 200 * 2**20, f"server RSS peaked at {rss.peak / 2**20:.0f} MB"
    assert elapsed < 60, f"30 MB took {elapsed:.1f}s"

    # The slow clients were closed (4008, then their socket dropped) and are gone.
    stats = await admin.request("stats")
    assert stats["connections"] == 3, stats  # admin, reader, writer
    for raw in raws:
        closed, code = await asyncio.to_thread(raw.drain_until_closed, 10.0)
        assert closed, "a slow consumer was never disconnected"
        assert code in (None, 4008), code
        assert raw.bytes_read < 16 * 2**20, "a slow consumer got most of the stream"
        raw.close()
    # And may reconnect and resume.
    again = await Peer.open(broker.url, token)
    assert (await again.request("sub", topic="firehose", last=1))["op"] == "ok"
    assert (await again.recv())["seq"] == acked[-1]


async def test_slow_consumer_close_code_is_4008(make_broker) -> None:  # type: ignore[no-untyped-def]
    """A websockets client that stops reading sees the 4008 close once it reads again."""
    broker = make_broker("--max-queue", "64KiB", memory=True)
    lazy = await connect(
        broker.url,
        additional_headers={"Authorization": f"Bearer {broker.token('lazy')}"},
        max_queue=1,  # stop reading from the socket after one unread frame
        max_size=None,
    )
    lazy.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert orjson.loads(await lazy.recv())["op"] == "hello"
    await lazy.send(json.dumps({"op": "sub", "id": 1, "topic": "t"}))
    assert orjson.loads(await lazy.recv())["op"] == "ok"
    pub = await Peer.open(broker.url, broker.token("p"))
    for i in range(400):  # 400 x 30 KB: far more than kernel buffers plus 64 KiB
        await pub.send({"op": "pub", "topic": "t", "data": "y" * 30_000, "id": i})
        if i % 50 == 49:
            await pub.recv()
    code = None
    deadline = time.monotonic() + 15
    with contextlib.suppress(ConnectionClosed):
        while time.monotonic() < deadline:
            await asyncio.wait_for(lazy.recv(), deadline - time.monotonic())
    code = lazy.close_code
    assert code in (4008, 1006), code  # 4008 when the close frame made it, else the abort
    if code == 4008:
        assert lazy.close_reason == "slow consumer"


# -- rate limit, connection and subscription caps --------------------------------------


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


# -- token expiry and refresh ----------------------------------------------------------


def short_token(user: str = "1", seconds: int = 2, **claims: Any) -> tuple[str, int]:
    exp = int(time.time()) + seconds
    return jwt.encode({"sub": user, "exp": exp, **claims}, SECRET, algorithm="HS256"), exp


async def test_token_expiry_closes_4003(broker: BrokerProcess) -> None:
    frame_token, exp = short_token("1")
    by_frame = await Peer.open(broker.url, frame_token)
    by_header = await Peer.open_with_header(broker.url, frame_token)
    assert (await by_header.recv())["op"] == "hello"
    # Before exp the connections work.
    assert (await by_frame.request("sub", topic="t"))["op"] == "ok"
    for peer in (by_frame, by_header):
        code, reason, frames = await closed_with(peer, timeout=exp - time.time() + 3)
        assert frames == []
        assert (code, reason) == (4003, "token expired")
    assert time.time() >= exp - 0.05


async def test_token_refresh_keeps_the_connection(broker: BrokerProcess) -> None:
    token, exp = short_token("1", name="Old")
    with_id = await Peer.open(broker.url, token)
    without_id = await Peer.open_with_header(broker.url, token)
    assert (await without_id.recv())["op"] == "hello"
    never_expiring = await Peer.open(
        broker.url, jwt.encode({"sub": "1"}, SECRET, algorithm="HS256")
    )

    new_exp = int(time.time()) + 3600
    fresh = jwt.encode({"sub": "1", "name": "New", "exp": new_exp}, SECRET, algorithm="HS256")
    await with_id.send({"op": "auth", "token": fresh, "id": "r1"})
    assert await with_id.recv() == {"op": "ok", "id": "r1", "exp": new_exp}
    await without_id.send({"op": "auth", "token": fresh})
    await without_id.expect_nothing(0.5)
    # A token without exp is refreshed by one with exp: then it expires (4003).
    short, short_exp = short_token("1", seconds=2)
    await never_expiring.send({"op": "auth", "token": short, "id": 7})
    assert await never_expiring.recv() == {"op": "ok", "id": 7, "exp": short_exp}
    # And a refresh with no exp: "exp": null.
    await with_id.send(
        {"op": "auth", "token": jwt.encode({"sub": "1", "name": "New"}, SECRET), "id": "r2"}
    )
    assert await with_id.recv() == {"op": "ok", "id": "r2", "exp": None}

    # Real time: the broker's expiry timers run in its own process, on its own clock.
    await asyncio.sleep(max(exp, short_exp) - time.time() + 1.0)
    code, reason, _ = await closed_with(never_expiring, timeout=1)
    assert (code, reason) == (4003, "token expired")
    for peer in (with_id, without_id):
        assert (await peer.request("sub", topic="t"))["op"] == "ok", "closed at the old exp"
    # The refreshed token is in force: msg.from carries its name.
    await without_id.request("pub", topic="t", data=1)
    assert (await with_id.recv())["from"] == {"id": "1", "name": "New"}


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda: jwt.encode({"sub": "2", "exp": int(time.time()) + 600}, SECRET), "same user"),
        (lambda: "garbage", "malformed token"),
        (
            lambda: jwt.encode({"sub": "1"}, "another-secret-another-secret-0123"),
            "invalid signature",
        ),
        (lambda: jwt.encode({"sub": "1", "exp": int(time.time()) - 5}, SECRET), "token expired"),
        (lambda: jwt.encode({"sub": "1", "nbf": int(time.time()) + 60}, SECRET), "not yet valid"),
        (lambda: alg_none("none", {"sub": "1"}), "algorithm"),
    ],
    ids=["other-user", "garbage", "bad-signature", "expired", "not-yet-valid", "alg-none"],
)
async def test_bad_refresh_closes_4001(
    broker: BrokerProcess, make_token: Callable[[], str], reason: str
) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    assert (await peer.request("sub", topic="t"))["op"] == "ok"
    await peer.send({"op": "auth", "token": make_token(), "id": "refresh"})
    code, _, frames = await closed_with(peer)
    assert len(frames) == 1, frames
    error = frames[0]
    assert (error["op"], error["code"], error["id"]) == ("error", "unauthorized", "refresh")
    assert reason in error["message"]
    assert code == 4001


async def test_refresh_drops_subscriptions_the_new_acl_forbids(broker: BrokerProcess) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    for pattern in ["news", "scores/uk", "scores/+", "user/1"]:
        assert (await peer.request("sub", topic=pattern))["op"] == "ok"
    pub = await Peer.open(broker.url, broker.token("2"))
    await pub.request("pub", topic="news", data="before")
    assert (await peer.recv())["data"] == "before"

    narrower = broker.token("1", sub=["scores/uk"], pub=[])
    reply = await peer.request("auth", token=narrower)
    assert reply["op"] == "ok"
    for topic in ["news", "scores/fr", "scores/uk", "user/1"]:
        await pub.request("pub", topic=topic, data=topic)
    got = [(await peer.recv())["data"] for _ in range(2)]
    assert got == ["scores/uk", "user/1"]  # news and scores/+ were dropped; own inbox stays
    await peer.expect_nothing()
    # The new ACL governs new requests too.
    assert (await peer.request("sub", topic="news"))["code"] == "forbidden"
    assert (await peer.request("pub", topic="scores/uk", data=1))["code"] == "forbidden"


async def test_close_code_survives_frames_in_flight_4001(broker: BrokerProcess) -> None:
    """A bad refresh followed at once by another frame: still error + 4001, every time."""
    codes = []
    for _ in range(12):
        peer = await Peer.open(broker.url, broker.token("1"))
        await peer.send({"op": "auth", "token": "garbage", "id": 1})
        for _ in range(5):
            await peer.send({"op": "pub", "topic": "a", "data": 1})
        code, _, frames = await closed_with(peer)
        assert frames and frames[0]["code"] == "unauthorized"
        codes.append(code)
    assert codes == [4001] * 12, codes


async def test_close_code_survives_frames_in_flight_4003(broker: BrokerProcess) -> None:
    """Connections that keep sending when their token expires still get 4003."""
    base = time.time() + 1.5

    async def busy(i: int) -> int | None:
        exp = base + i * 0.03  # staggered, so the expiries are independent trials
        peer = await Peer.open(broker.url, jwt.encode({"sub": "1", "exp": exp}, SECRET))

        async def drain() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await peer.ws.recv()

        reader = asyncio.create_task(drain())
        with contextlib.suppress(ConnectionClosed):
            while time.time() < exp + 3:
                for _ in range(10):
                    await peer.send({"op": "presence", "id": 1, "topic": "a"})
                await asyncio.sleep(0.001)  # let the reader run: requests, not a flood
        await reader
        return peer.ws.close_code

    codes = await asyncio.gather(*(busy(i) for i in range(20)))
    assert codes == [4003] * 20, codes


# -- RS256 and ES256 -------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_asymmetric_keys_end_to_end(make_broker, tmp_path: Path, algorithm: str) -> None:  # type: ignore[no-untyped-def]
    make_pair = rsa_keypair if algorithm == "RS256" else ec_keypair
    key, public = make_pair(tmp_path, "server")
    attacker, _ = make_pair(tmp_path, "attacker")
    broker = make_broker(
        "--algorithm", algorithm, "--public-key", str(public), secret=None, memory=True
    )
    exp = int(time.time()) + 600

    def mint(user: str, signer: Any = key, headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(
            {"sub": user, "name": user.title(), "exp": exp},
            signer,
            algorithm=algorithm,
            headers=headers,
        )

    # Good tokens, both ways, and a round trip.
    alice = await Peer.open_with_header(broker.url, mint("alice"))
    assert (await alice.recv())["user"] == {"id": "alice", "name": "Alice"}
    bob = await Peer.open(broker.url, mint("bob"))
    assert (await alice.request("sub", topic="k"))["op"] == "ok"
    await bob.request("pub", topic="k", data=algorithm)
    msg = await alice.recv()
    assert msg["data"] == algorithm and msg["from"] == {"id": "bob", "name": "Bob"}

    pem = public.read_bytes()
    claims = {"sub": "mallory", "exp": exp}
    good = mint("mallory")
    h, p, s = good.split(".")
    forged = {
        # HS/RS confusion: the public key, which anyone has, used as an HMAC secret.
        "hs256-with-public-pem": (
            forge({"alg": "HS256", "typ": "JWT"}, claims, pem),
            "invalid algorithm",
        ),
        "hs512-with-public-pem": (
            forge({"alg": "HS512"}, claims, pem, hashlib.sha512),
            "invalid algorithm",
        ),
        # Same, claiming the configured algorithm.
        "hmac-sig-claiming-alg": (forge({"alg": algorithm}, claims, pem), "invalid signature"),
        "other-key": (mint("mallory", attacker), "invalid signature"),
        # An attacker's public key embedded in the header must not be trusted.
        "embedded-jwk": (
            mint(
                "mallory",
                attacker,
                {
                    "jwk": json.loads(
                        jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(
                            attacker.public_key()
                        )
                    )
                },
            ),
            "invalid signature",
        ),
        "jku": (
            mint("mallory", attacker, {"jku": "http://127.0.0.1:9/jwks.json", "kid": "k1"}),
            "invalid signature",
        ),
        "alg-none": (alg_none("none", claims), "invalid algorithm"),
        "alg-swapped": (
            segment({"alg": "PS256" if algorithm == "RS256" else "ES384"}) + f".{p}.{s}",
            "invalid algorithm",
        ),
        "tampered-payload": (
            f"{h}.{segment({'sub': 'admin', 'exp': exp, 'admin': True})}.{s}",
            "invalid signature",
        ),
        "stripped-signature": (f"{h}.{p}.", "invalid signature"),
        "expired": (
            jwt.encode({"sub": "m", "exp": int(time.time()) - 10}, key, algorithm=algorithm),
            "token expired",
        ),
    }
    for label, (token, reason) in forged.items():
        status, body = await refusal(broker.url, {"Authorization": f"Bearer {token}"})
        assert status == 401 and reason in body, (label, status, body)
        peer = await Peer.open(broker.url)
        await peer.send({"op": "auth", "token": token, "id": label})
        code, _, frames = await closed_with(peer)
        assert code == 4001 and len(frames) == 1, (label, code, frames)
        assert frames[0]["code"] == "unauthorized" and reason in frames[0]["message"], (
            label,
            frames,
        )
    # The broker is still fine afterwards.
    assert (await alice.request("sub", topic="after"))["op"] == "ok"


def test_cli_token_signs_with_private_key(tmp_path: Path) -> None:
    key, public = rsa_keypair(tmp_path)
    private = tmp_path / "rsa.key.pem"
    private.write_bytes(private_pem(key))
    out = subprocess.run(  # noqa: PLW1510 - the exit code is asserted below
        [
            sys.executable,
            "-m",
            "broker.cli",
            "token",
            "--id",
            "alice",
            "--algorithm",
            "RS256",
            "--private-key",
            str(private),
        ],
        cwd=ROOT,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), public.read_bytes(), algorithms=["RS256"])
    assert claims["sub"] == "alice"


# -- forged tokens ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """HS256 with --audience, --issuer and --require-exp."""
    proc = started(
        tmp_path_factory.mktemp("strict"),
        "--audience",
        AUD,
        "--issuer",
        ISS,
        "--require-exp",
        memory=True,
    )
    yield proc
    proc.kill()


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "mallory",
        "name": "M",
        "aud": AUD,
        "iss": ISS,
        "exp": int(time.time()) + 300,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def valid() -> str:
    return forge({"alg": "HS256", "typ": "JWT"}, claims())


def resign_header(header: dict[str, Any]) -> str:
    """The valid token's payload and signature under a different header."""
    _, p, s = valid().split(".")
    return f"{segment(header)}.{p}.{s}"


def tamper_payload() -> str:
    h, _, s = valid().split(".")
    return f"{h}.{segment(claims(sub='admin', admin=True))}.{s}"


FORGERIES: list[Any] = [
    # alg none in its spellings, with and without a signature
    pytest.param(lambda: alg_none("none", claims()), "invalid algorithm", id="alg-none"),
    pytest.param(lambda: alg_none("None", claims()), "invalid algorithm", id="alg-None"),
    pytest.param(lambda: alg_none("NONE", claims()), "invalid algorithm", id="alg-NONE"),
    pytest.param(lambda: alg_none("nOnE", claims()), "invalid algorithm", id="alg-nOnE"),
    pytest.param(
        lambda: resign_header({"alg": "none", "typ": "JWT"}),
        "invalid algorithm",
        id="alg-none-with-sig",
    ),
    pytest.param(
        lambda: forge({"alg": "none"}, claims()), "invalid algorithm", id="alg-none-hmac-signed"
    ),
    pytest.param(lambda: forge({"typ": "JWT"}, claims()), "invalid algorithm", id="alg-missing"),
    pytest.param(lambda: forge({"alg": None}, claims()), "invalid algorithm", id="alg-null"),
    pytest.param(lambda: forge({"alg": ["HS256"]}, claims()), "invalid algorithm", id="alg-list"),
    pytest.param(
        lambda: forge({"alg": "hs256"}, claims()), "invalid algorithm", id="alg-lowercase"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256 "}, claims()), "invalid algorithm", id="alg-trailing-space"
    ),
    # other algorithms with the right secret
    pytest.param(
        lambda: forge({"alg": "HS512"}, claims(), digest=hashlib.sha512),
        "invalid algorithm",
        id="HS512",
    ),
    pytest.param(
        lambda: forge({"alg": "HS384"}, claims(), digest=hashlib.sha384),
        "invalid algorithm",
        id="HS384",
    ),
    pytest.param(
        lambda: forge({"alg": "RS256"}, claims()), "invalid algorithm", id="RS256-hmac-signed"
    ),
    pytest.param(
        lambda: forge({"alg": "ES256"}, claims()), "invalid algorithm", id="ES256-hmac-signed"
    ),
    # signature games
    pytest.param(
        lambda: valid().rsplit(".", 1)[0] + ".", "invalid signature", id="signature-stripped"
    ),
    pytest.param(lambda: valid().rsplit(".", 1)[0], "malformed token", id="two-segments"),
    pytest.param(lambda: valid() + ".x.y", "malformed", id="five-segments"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(), b"x" * 40), "invalid signature", id="other-secret"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(), b""), "invalid signature", id="empty-secret"
    ),
    pytest.param(tamper_payload, "invalid signature", id="payload-tampered"),
    pytest.param(
        lambda: resign_header({"alg": "HS256", "typ": "JWT", "kid": "x"}),
        "invalid signature",
        id="header-tampered",
    ),
    pytest.param(
        lambda: valid()[:-4] + ("AAAA" if not valid().endswith("AAAA") else "BBBB"),
        "invalid signature",
        id="signature-bitflip",
    ),
    # key-selection header tricks: ignored, the configured key decides
    pytest.param(
        lambda: forge({"alg": "HS256", "kid": "../../../../../../dev/null"}, claims(), b""),
        "invalid signature",
        id="kid-path-traversal",
    ),
    pytest.param(
        lambda: forge(
            {"alg": "HS256", "kid": "' UNION SELECT 'attacker'--"}, claims(), b"attacker"
        ),
        "invalid signature",
        id="kid-sql",
    ),
    pytest.param(
        lambda: forge(
            {"alg": "HS256", "jku": "http://127.0.0.1:9/jwks.json", "kid": "a"},
            claims(),
            b"attacker-secret",
        ),
        "invalid signature",
        id="jku",
    ),
    pytest.param(
        lambda: forge(
            {"alg": "HS256", "x5u": "http://127.0.0.1:9/cert.pem"}, claims(), b"attacker-secret"
        ),
        "invalid signature",
        id="x5u",
    ),
    pytest.param(
        lambda: forge(
            {"alg": "HS256", "jwk": {"kty": "oct", "k": b64(b"attacker-secret")}},
            claims(),
            b"attacker-secret",
        ),
        "invalid signature",
        id="embedded-jwk",
    ),
    pytest.param(
        lambda: forge({"alg": "HS256", "crit": ["exp"]}, claims()), "malformed", id="crit-unknown"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256", "crit": ["b64"], "b64": False}, claims()),
        "malformed",
        id="crit-b64",
    ),
    # time claims
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(exp=int(time.time()) - 2)),
        "token expired",
        id="expired",
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(exp=0)), "token expired", id="exp-zero"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(exp="tomorrow")), "exp", id="exp-not-a-number"
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(exp=...)), "'exp'", id="exp-missing"),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(exp=None)), "exp", id="exp-null"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(nbf=int(time.time()) + 60)),
        "not yet valid",
        id="nbf-future",
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(nbf="soon")), "nbf", id="nbf-string"),
    # audience and issuer
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(aud="someone-else")),
        "invalid audience",
        id="aud-wrong",
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(aud=["a", "b"])),
        "invalid audience",
        id="aud-list-wrong",
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(aud=...)), "'aud'", id="aud-missing"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(aud=AUD.upper())), "invalid audience", id="aud-case"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(iss="https://evil.example")),
        "invalid issuer",
        id="iss-wrong",
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(iss=...)), "'iss'", id="iss-missing"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(iss=ISS + "/")), "invalid issuer", id="iss-suffix"
    ),
    # malformed structure
    pytest.param(lambda: "not-a-jwt", "malformed token", id="garbage"),
    pytest.param(lambda: "!!!.@@@.###", "malformed token", id="non-base64"),
    pytest.param(
        lambda: forge(b"not json at all", claims()), "malformed token", id="header-not-json"
    ),
    pytest.param(lambda: forge(b'["HS256"]', claims()), "malformed token", id="header-array"),
    pytest.param(lambda: forge({"alg": "HS256"}, b"not json"), "invalid", id="payload-not-json"),
    pytest.param(lambda: forge({"alg": "HS256"}, b"[1,2]"), "invalid", id="payload-array"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(pad="p" * 5000), b"wrong"),
        "invalid signature",
        id="huge-6KB",
    ),
    # unusable user ids, correctly signed
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub="")), "user id", id="sub-empty"),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub="a/b")), "user id", id="sub-slash"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(sub="user/2")), "user id", id="sub-inbox-path"
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub="+")), "user id", id="sub-plus"),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub="a#")), "user id", id="sub-hash"),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub=None)), "user id", id="sub-null"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(sub=..., id="")), "user id", id="id-claim-empty"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(sub=..., id="x/y")), "user id", id="id-claim-slash"
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub=True)), "user id", id="sub-bool"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(sub={"id": "1"})), "user id", id="sub-object"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(acl="everything")), "acl", id="acl-not-object"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(acl={"sub": "#"})), "acl", id="acl-sub-string"
    ),
]


async def test_strict_broker_accepts_a_valid_token(strict_broker: BrokerProcess) -> None:
    """The control for the forgeries below: the same broker lets a correct token in."""
    peer = await Peer.open_with_header(strict_broker.url, valid())
    assert (await peer.recv())["user"] == {"id": "mallory", "name": "M"}
    peer = await Peer.open(strict_broker.url, forge({"alg": "HS256"}, claims(aud=["x", AUD])))
    assert (await peer.request("sub", topic="t"))["op"] == "ok"


@pytest.mark.parametrize(("make_token", "reason"), FORGERIES)
async def test_forged_token_in_header_is_401(
    strict_broker: BrokerProcess, make_token: Callable[[], str], reason: str
) -> None:
    status, body = await refusal(strict_broker.url, {"Authorization": f"Bearer {make_token()}"})
    assert status == 401
    line = body.strip()
    assert reason in line and line and "\n" not in line, body


@pytest.mark.parametrize(("make_token", "reason"), FORGERIES)
async def test_forged_token_in_first_frame_is_4001(
    strict_broker: BrokerProcess, make_token: Callable[[], str], reason: str
) -> None:
    peer = await Peer.open(strict_broker.url)
    await peer.send({"op": "auth", "token": make_token(), "id": "forged"})
    code, _, frames = await closed_with(peer)
    assert len(frames) == 1, frames
    error = frames[0]
    assert (error["op"], error["code"], error.get("id")) == ("error", "unauthorized", "forged"), (
        error
    )
    assert reason in error["message"], error
    assert code == 4001


async def test_oversized_tokens(strict_broker: BrokerProcess) -> None:
    """Tokens beyond what the handshake or a frame may carry are refused, never let in."""
    huge = forge({"alg": "HS256"}, claims(pad="p" * 100_000))
    status, _ = await refusal(strict_broker.url, {"Authorization": f"Bearer {huge}"})
    assert status in (400, 401, 413, 431), status
    peer = await Peer.open(strict_broker.url)
    await peer.send({"op": "auth", "token": huge})  # over the 64 KiB frame limit
    code, _, frames = await closed_with(peer)
    assert code in (1009, 4001) and all(f["op"] == "error" for f in frames), (code, frames)
    near_limit = forge({"alg": "HS256"}, claims(pad="p" * 45_000), b"wrong")
    peer = await Peer.open(strict_broker.url)
    await peer.send({"op": "auth", "token": near_limit})
    code, _, frames = await closed_with(peer)
    assert code == 4001 and "invalid signature" in frames[0]["message"]
    peer = await Peer.open_with_header(strict_broker.url, valid())  # still serving
    assert (await peer.recv())["op"] == "hello"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (
            lambda: Headers(
                [("Authorization", f"Bearer {valid()}"), ("Authorization", "Bearer forged")]
            ),
            401,
        ),
        (
            lambda: Headers(
                [("Authorization", "Bearer forged"), ("Authorization", f"Bearer {valid()}")]
            ),
            401,
        ),
    ],
    ids=["valid-then-forged", "forged-then-valid"],
)
async def test_duplicate_authorization_headers_are_401(
    strict_broker: BrokerProcess, headers: Callable[[], Headers], status: int
) -> None:
    got, body = await refusal(strict_broker.url, headers())
    assert (got, "\n" in body.strip()) == (status, False), (got, body)


# -- wss -------------------------------------------------------------------------------


async def test_wss_end_to_end(make_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = self_signed_cert(tmp_path)
    broker = make_broker("--tls-cert", str(cert), "--tls-key", str(key), memory=True)
    trusting = ssl.create_default_context(cafile=str(cert))
    for host in ("127.0.0.1", "localhost"):
        url = f"wss://{host}:{broker.port}/ws"
        reader = Peer(await connect(url, ssl=trusting, open_timeout=10))
        await reader.send({"op": "auth", "token": broker.token("r")})
        assert (await reader.recv())["op"] == "hello"
        assert (await reader.request("sub", topic="secure"))["op"] == "ok"
        writer = Peer(
            await connect(
                url,
                ssl=trusting,
                additional_headers={"Authorization": f"Bearer {broker.token('w', 'W')}"},
            )
        )
        assert (await writer.recv())["op"] == "hello"
        ok = await writer.request("pub", topic="secure", data={"host": host})
        msg = await reader.recv()
        assert (msg["data"], msg["seq"], msg["from"]) == (
            {"host": host},
            ok["seq"],
            {"id": "w", "name": "W"},
        )
        assert writer.ws.transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        await reader.close()
        await writer.close()
    assert await asyncio.to_thread(
        http_get, f"https://127.0.0.1:{broker.port}/healthz", trusting
    ) == (200, b"ok")

    # A client that does not trust the certificate fails, and so does a wrong host name.
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect(
            f"wss://127.0.0.1:{broker.port}/ws", ssl=ssl.create_default_context(), open_timeout=10
        )
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect(
            f"wss://127.0.0.1:{broker.port}/ws",
            ssl=trusting,
            server_hostname="evil.example",
            open_timeout=10,
        )
    # Plain ws:// to the TLS port gets no WebSocket.
    with pytest.raises((InvalidMessage, InvalidStatus, OSError, asyncio.TimeoutError)):
        ws = await connect(broker.url, open_timeout=5)
        await ws.close()

    # The CLI trusts the certificate with --ca-file, and refuses without it.
    reader = Peer(await connect(f"wss://localhost:{broker.port}/ws", ssl=trusting))
    await reader.send({"op": "auth", "token": broker.token("r")})
    await reader.recv()
    await reader.request("sub", topic="cli")
    base = [
        sys.executable,
        "-m",
        "broker.cli",
        "pub",
        "cli",
        "from-cli",
        "--url",
        f"wss://localhost:{broker.port}/ws",
        "--token",
        broker.token("cli"),
    ]
    env = isolated_env(tmp_path)
    env.pop("BROKER_CA_FILE", None)
    run = await asyncio.to_thread(
        subprocess.run,
        base + ["--ca-file", str(cert)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    msg = await reader.recv()
    assert (msg["data"], msg["from"]["id"]) == ("from-cli", "cli")
    run = await asyncio.to_thread(
        subprocess.run, base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert run.returncode != 0
    await reader.expect_nothing()


# -- origin check ----------------------------------------------------------------------


async def test_allowed_origins(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker(
        "--allowed-origin",
        "http://good.example",
        "--allowed-origin",
        "https://also.example:8443",
        memory=True,
    )
    token = broker.token("1")
    for origin in [
        "http://evil.example",
        "null",
        "http://good.example.evil.example",
        "http://good.example:8080",
        "https://good.example",
        "https://also.example",
        "http://evil.example/http://good.example",
    ]:
        status, body = await refusal(
            broker.url, {"Authorization": f"Bearer {token}"}, origin=Origin(origin)
        )
        assert status == 403 and body.strip(), (origin, status, body)
        # Origin is checked before authentication, with or without a token.
        status, _ = await refusal(broker.url, {}, origin=Origin(origin))
        assert status == 403, origin
    for good in ["http://good.example", "https://also.example:8443", None]:
        allowed = Origin(good) if good is not None else None
        ws = await connect(
            broker.url, additional_headers={"Authorization": f"Bearer {token}"}, origin=allowed
        )
        assert orjson.loads(await ws.recv())["op"] == "hello"
        await ws.close()
        peer = Peer(await connect(broker.url, origin=allowed))  # first-frame auth
        await peer.send({"op": "auth", "token": token})
        assert (await peer.recv())["op"] == "hello"
        await peer.close()
    # Plain HTTP paths are not WebSocket upgrades: unaffected.
    assert await asyncio.to_thread(http_get, broker.http_url + "/healthz") == (200, b"ok")


async def test_compression_not_negotiated_by_default(broker: BrokerProcess) -> None:
    """No permessage-deflate unless the server is started with compression (docs/protocol.md):
    nothing to inflate, so no decompression bombs."""
    ws = await connect(
        broker.url,
        compression="deflate",
        additional_headers={"Authorization": f"Bearer {broker.token('1')}"},
    )
    assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
    assert orjson.loads(await ws.recv())["op"] == "hello"
    await ws.close()


async def test_duplicate_origin_headers_are_403(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker("--allowed-origin", "http://good.example", memory=True)
    headers = Headers([("Origin", "http://good.example"), ("Origin", "http://evil.example")])
    status, _ = await refusal(broker.url, headers)
    assert status == 403


# -- fuzzing ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    proc = started(tmp_path_factory.mktemp("fuzz"), "--history", "50", memory=True)
    yield proc
    proc.kill()


OPS = ["auth", "sub", "unsub", "pub", "presence", "stats"]
SERVER_OPS = {"hello", "ok", "error", "msg", "join", "leave"}
EXPECTED_ERROR_CODES = set(ERROR_CODES) - {"internal"}  # a fuzzed frame is never a server bug

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)
topic_like = st.one_of(
    st.sampled_from(
        [
            "a",
            "a/b",
            "a/+",
            "#",
            "+/#",
            "a//b",
            "",
            "/",
            "$SYS/x",
            "user/fuzz",
            "user/other/x",
            "a#",
            "a/#/b",
            "é/ü",
            "x" * 300,
        ]
    ),
    st.text(max_size=12),
    json_value,
)
ids = st.one_of(st.integers(), st.text(max_size=6), json_value)
counts = st.one_of(st.integers(min_value=-3, max_value=2**66), json_value)


def _sign(claims: dict[str, Any], key: bytes = SECRET_B) -> str:
    try:
        return forge({"alg": "HS256", "typ": "JWT"}, claims, key)
    except (TypeError, ValueError):
        return "unencodable"


claims_st = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.one_of(st.sampled_from(["fuzz", "other", "", "a/b", "1"]), json_value),
        "id": json_value,
        "name": json_value,
        "exp": st.one_of(
            st.integers(min_value=-(2**40), max_value=2**80),
            st.floats(allow_nan=False, allow_infinity=False),
            json_value,
        ),
        "nbf": st.one_of(st.integers(min_value=-(2**40), max_value=2**80), json_value),
        "iat": json_value,
        "acl": st.one_of(
            json_value,
            st.fixed_dictionaries(
                {},
                optional={
                    "pub": st.lists(topic_like, max_size=3),
                    "sub": st.lists(topic_like, max_size=3),
                },
            ),
        ),
        "admin": json_value,
    },
)
tokens = st.one_of(
    st.builds(_sign, claims_st),  # correctly signed, random claims
    st.builds(_sign, claims_st, st.binary(max_size=8)),  # random claims, wrong key
    st.builds(
        lambda a, b, c: f"{a}.{b}.{c}",
        st.text(max_size=20),
        st.text(max_size=40),
        st.text(max_size=20),
    ),
    st.builds(
        lambda h, p: forge(h, p),
        st.dictionaries(st.text(max_size=5), json_value, max_size=3),
        claims_st,
    ),
    st.text(max_size=50),
    json_value,
)
op_frames = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(OPS), json_value)},
    optional={
        "id": ids,
        "topic": topic_like,
        "data": json_value,
        "since": counts,
        "last": counts,
        "epoch": json_value,
        "echo": json_value,
        "presence": json_value,
        "token": tokens,
    },
)
frames_st = st.lists(
    st.one_of(
        op_frames.map(lambda f: ("json", f)),
        st.fixed_dictionaries({"op": st.just("auth")}, optional={"id": ids, "token": tokens}).map(
            lambda f: ("json", f)
        ),
        json_value.map(lambda v: ("json", v)),
        st.text(max_size=60).map(lambda t: ("text", t)),
        st.binary(max_size=60).map(lambda b: ("bytes", b)),
    ),
    min_size=1,
    max_size=8,
)


def check_server_frame(raw: str | bytes) -> dict[str, Any]:
    assert isinstance(raw, str), "the server sent a binary frame"
    frame = orjson.loads(raw)
    assert isinstance(frame, dict) and frame.get("op") in SERVER_OPS, frame
    if frame["op"] == "error":
        assert frame["code"] in EXPECTED_ERROR_CODES, frame
        assert isinstance(frame["message"], str) and frame["message"], frame
    return frame


def wire(kind: str, value: Any) -> str | bytes:
    if kind == "json":
        return json.dumps(value)  # stdlib: ints beyond 64 bits too
    return value


async def fuzz_one(
    broker: BrokerProcess, frames: list[tuple[str, Any]], junk: bytes, header_token: Any = None
) -> None:
    # 1. An authenticated connection gets every frame, then a sentinel request.
    ws = await connect(
        broker.url,
        additional_headers={"Authorization": f"Bearer {broker.token('fuzz')}"},
        max_size=None,
    )
    assert check_server_frame(await ws.recv())["op"] == "hello"
    sent_auth = False
    for kind, value in frames:
        sent_auth |= kind == "json" and isinstance(value, dict) and value.get("op") == "auth"
        with contextlib.suppress(ConnectionClosed):
            await ws.send(wire(kind, value))
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps({"op": "presence", "id": "sentinel", "topic": "sentinel"}))
    seen_codes: list[str] = []
    try:
        while True:
            frame = check_server_frame(await asyncio.wait_for(ws.recv(), 10))
            seen_codes.append(frame.get("code", frame["op"]))
            if frame.get("id") == "sentinel" and frame["op"] in ("ok", "error"):
                assert frame["op"] == "ok", frame
                break
    except ConnectionClosed:
        # Only a bad refresh closes (4001), or a refresh with a token about to expire (4003).
        assert sent_auth and ws.close_code in (4001, 4003), (ws.close_code, ws.close_reason)
        if ws.close_code == 4001:
            assert "unauthorized" in seen_codes, (ws.close_code, seen_codes)
    await ws.close()

    # 2. An unauthenticated connection gets the first frame: hello, or unauthorized + 4001.
    kind, value = frames[0]
    ws = await connect(broker.url, max_size=None)
    await ws.send(wire(kind, value))
    try:
        frame = check_server_frame(await asyncio.wait_for(ws.recv(), 10))
        if frame["op"] == "hello":
            assert isinstance(value, dict) and value.get("op") == "auth"
        else:
            assert (frame["op"], frame["code"]) == ("error", "unauthorized"), frame
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 4001
    except ConnectionClosed:
        # A refused auth whose token expired in between is still "unauthorized"; any other
        # close without an error frame is wrong.
        raise AssertionError(f"closed {ws.close_code} without an error frame") from None
    await ws.close()

    # 3. A random token in the handshake header: 101 + hello, or 401 with a one-line reason.
    if isinstance(header_token, str) and header_token.isascii() and header_token.isprintable():
        try:
            ws = await connect(
                broker.url,
                additional_headers={"Authorization": f"Bearer {header_token}"},
                open_timeout=10,
            )
        except InvalidStatus as exc:
            assert exc.response.status_code == 401, exc.response
            assert (exc.response.body or b"").strip() and b"\n" not in (
                exc.response.body or b""
            ).strip()
        else:
            assert check_server_frame(await asyncio.wait_for(ws.recv(), 10))["op"] == "hello"
            await ws.close()

    # 4. Junk on the raw TCP port, before any handshake.
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(junk)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(1024), 0.05)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@pytest.mark.slow
def test_fuzz_random_frames_then_round_trip(fuzz_broker: BrokerProcess) -> None:
    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(frames=frames_st, junk=st.binary(max_size=200), header_token=tokens)
    def fuzz(frames: list[tuple[str, Any]], junk: bytes, header_token: Any) -> None:
        asyncio.run(fuzz_one(fuzz_broker, frames, junk, header_token))
        assert fuzz_broker.proc is not None and fuzz_broker.proc.poll() is None, fuzz_broker.log()[
            -3000:
        ]

    fuzz()

    async def round_trip() -> None:
        reader = await Peer.open(fuzz_broker.url, fuzz_broker.token("reader"))
        assert (await reader.request("sub", topic="final/+"))["op"] == "ok"
        writer = await Peer.open_with_header(fuzz_broker.url, fuzz_broker.token("writer", "Writer"))
        assert (await writer.recv())["op"] == "hello"
        ok = await writer.request("pub", topic="final/check", data={"still": "alive"})
        msg = await reader.recv()
        assert msg["op"] == "msg" and msg["seq"] == ok["seq"]
        assert (msg["data"], msg["from"]) == (
            {"still": "alive"},
            {"id": "writer", "name": "Writer"},
        )

    asyncio.run(round_trip())
    assert fuzz_broker.proc is not None and fuzz_broker.proc.poll() is None
    assert http_get(fuzz_broker.http_url + "/healthz") == (200, b"ok")
    log = fuzz_broker.log()
    assert "Traceback" not in log and "internal error" not in log, log[-5000:]


# -- graceful shutdown -----------------------------------------------------------------


async def test_graceful_shutdown(make_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # On-disk store: an ok means durably recorded. History large enough to keep them all.
    broker = make_broker("--drain-timeout", "10", "--history", "100000")
    reader = await Peer.open_with_header(broker.url, broker.token("reader"))
    assert (await reader.recv())["op"] == "hello"
    assert (await reader.request("sub", topic="t"))["op"] == "ok"
    writer = await Peer.open(broker.url, broker.token("writer"))
    pending_auth = await Peer.open(broker.url)  # connected, not yet authenticated
    replies: dict[int, dict[str, Any]] = {}

    async def collect() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await writer.recv(timeout=15)
                replies[frame["id"]] = frame

    async def publish() -> int:
        """Publish without pause until the server closes: some land during the drain."""
        sent = 0
        with contextlib.suppress(ConnectionClosed):
            while sent < 20_000:
                await writer.send({"op": "pub", "topic": "t", "data": sent, "id": sent})
                sent += 1
                if sent % 20 == 0:
                    await asyncio.sleep(0.001)  # let the collector read the replies
        return sent

    collector = asyncio.create_task(collect())
    publisher = asyncio.create_task(publish())
    deadline = time.monotonic() + 10
    while len(replies) < 100:  # publishes are flowing: the drain will land among them
        assert time.monotonic() < deadline, "no replies to the publisher"
        await asyncio.sleep(0.01)
    assert broker.proc is not None
    began = time.monotonic()
    broker.proc.send_signal(signal.SIGTERM)
    sent = await asyncio.wait_for(publisher, 15)
    await asyncio.wait_for(collector, 15)
    assert writer.ws.close_code == 1001
    outcomes = collections.Counter(r.get("code", r["op"]) for r in replies.values())
    assert set(outcomes) <= {"ok", "unavailable"}, outcomes
    assert outcomes["ok"] > 0 and sent < 20_000
    acked = {r["seq"] for r in replies.values() if r["op"] == "ok"}
    code, _, received = await closed_with(reader, timeout=10)
    assert code == 1001
    assert {m["op"] for m in received} <= {"msg"}
    code, _, frames = await closed_with(pending_auth, timeout=10)
    assert code == 1001 and frames == []

    rc = await asyncio.to_thread(broker.proc.wait, 15)
    elapsed = time.monotonic() - began
    assert rc == 0, broker.log()[-3000:]
    assert elapsed < 5, f"exit took {elapsed:.1f}s (drain timeout 10s)"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", broker.port), timeout=1).close()

    # Everything acknowledged was recorded.
    broker.start()
    late = await Peer.open(broker.url, broker.token("late"))
    assert (await late.request("sub", topic="t", since=0))["op"] == "ok"
    replayed: set[int] = set()
    with contextlib.suppress(asyncio.TimeoutError):
        while True:
            replayed.add((await late.recv(timeout=1.0))["seq"])
    assert acked <= replayed, sorted(acked - replayed)[:10]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_shutdown_is_bounded_by_drain_timeout(make_broker, sig: int) -> None:  # type: ignore[no-untyped-def]
    """A client that never reads and never answers the close does not hold the exit up;
    /healthz answers 503 or the port is closed while draining."""
    broker = make_broker("--drain-timeout", "2", memory=True)
    raw = RawClient(broker.port, broker.token("stuck"), rcvbuf=4096)
    assert raw.recv_json()["op"] == "hello"
    raw.send_json({"op": "sub", "id": 1, "topic": "t"})
    assert raw.recv_json()["op"] == "ok"
    pub = await Peer.open(broker.url, broker.token("p"))
    for i in range(20):  # ~600 KB queued towards the stuck client, under the 1 MiB limit
        await pub.send({"op": "pub", "topic": "t", "data": "z" * 30_000, "id": i})
    for _ in range(20):
        assert (await pub.recv())["op"] == "ok"
    assert broker.proc is not None
    began = time.monotonic()
    broker.proc.send_signal(sig)
    code, _, _ = await closed_with(pub, timeout=5)
    assert code == 1001
    health = await asyncio.to_thread(
        lambda: http_get(broker.http_url + "/healthz") if broker.proc.poll() is None else (0, b"")
    )
    assert health[0] != 200 or broker.proc.poll() is not None, health
    rc = await asyncio.to_thread(broker.proc.wait, 10)
    elapsed = time.monotonic() - began
    raw.close()
    assert rc == 0, broker.log()[-3000:]
    assert elapsed < 2 + 1.0, f"exit took {elapsed:.1f}s with --drain-timeout 2"
