"""A lean load generator for benchmarks/compare.py: many WebSocket connections per core.

Every connection is the client's own lean link (``broker.client.link.Link``: an
``asyncio.Protocol`` on the core's frame codec, uvloop when installed), so the load
generator's WebSocket is the one ``broker bench`` uses. Messages are not decoded: a few
byte look-ups tell a delivery from an ack. A sample of deliveries is decoded for latency:
every published payload starts with ``@@<time.time()>@@`` so the send time is found the
same way in any of the three wire formats.

Three wire protocols, one class each:

* ``broker`` -- this project's protocol (docs/protocol.md): ``Authorization: Bearer`` in the
  handshake, ``hello``, ``sub`` -> ``ok``; deliveries are ``msg`` text frames; acked
  publishes are ``pub`` with an ``id`` answered by ``ok``.
* ``socketio`` -- Socket.IO 4 over the Engine.IO 4 WebSocket transport: ``0{...}`` open,
  ``40{"token":...}`` connect with auth, ``42<id>["join",room]`` -> ``43<id>``; deliveries
  are ``42["message",...]``; acked publishes ``42<id>["message",{room,text}]`` -> ``43<id>``;
  pings ``2`` are answered ``3``.
* ``mqtt`` -- MQTT 5 in binary WebSocket frames (subprotocol ``mqtt``): CONNECT/CONNACK,
  SUBSCRIBE (QoS 0, No Local) / SUBACK; deliveries are PUBLISH packets; acked publishes are
  QoS 1 PUBLISH answered by PUBACK.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.client.link import Link  # noqa: E402
from broker.core.frames import BINARY, TEXT  # noqa: E402

try:  # pragma: no cover - optional
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]


def stamp_payload(size: int) -> bytes:
    """An application payload of ``size`` bytes carrying the send time."""
    head = b"@@%.6f@@" % time.time()
    return head + b"x" * max(0, size - len(head))


def stamp_of(data: bytes) -> float | None:
    """The send time ``stamp_payload`` put in a message, if there is one."""
    i = data.find(b"@@")
    if i < 0:
        return None
    j = data.find(b"@@", i + 2)
    if j < 0:
        return None
    try:
        return float(data[i + 2 : j])
    except ValueError:
        return None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


@dataclass
class Stats:
    """Counters shared by all connections of a run."""

    delivered: int = 0
    acked: int = 0
    errors: int = 0
    published: int = 0
    sample_every: int = 0  # 0: no latency samples
    latencies: list[float] = field(default_factory=list)
    ack_latencies: list[float] = field(default_factory=list)
    closed: int = 0
    links: list[Link] = field(default_factory=list)

    @property
    def bytes_in(self) -> int:
        """Bytes read by every connection so far."""
        return sum(link.bytes_received for link in self.links)


class Conn:
    """One WebSocket connection (a ``Link``); subclasses speak a protocol on top."""

    path = "/"
    subprotocol: str | None = None

    def __init__(
        self,
        stats: Stats,
        host: str,
        port: int,
        *,
        token: str = "",
        user: str = "",
        topics: tuple[str, ...] = (),
        pub_topics: tuple[str, ...] = (),
    ) -> None:
        self.stats = stats
        self.host, self.port = host, port
        self.token = token
        self.user = user
        self.topics = topics
        self.pub_topics = pub_topics
        self.per_topic = [0] * len(pub_topics)
        self.prefixes: list[bytes] = []
        self.link: Link | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.count = 0
        self.in_flight = 0
        self.window = 0
        self.publishing = False
        self.size = 100
        self.next_id = 0
        self.sent_at: dict[int, float] = {}
        self.track_acks = False

    # -- transport -----------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        return {}

    async def open(self, timeout: float) -> None:
        """Connect, upgrade, and wait until the protocol on top is ready."""
        headers = self.headers()
        if self.subprotocol:
            headers["Sec-WebSocket-Protocol"] = self.subprotocol
        url = f"ws://{self.host}:{self.port}{self.path}"
        self.link = Link(self.frame)  # set first: the first message may come with the upgrade
        await self.link.connect(url, headers, timeout)
        self.stats.links.append(self.link)
        self.link.closed.add_done_callback(self._lost)
        self.on_open()
        await asyncio.wait_for(asyncio.shield(self.ready), timeout)

    def _lost(self, _: object) -> None:
        self.stats.closed += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost"))

    def fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(why))
        self.abort()

    def abort(self) -> None:
        if self.link is not None and self.link.transport is not None:
            self.link.transport.abort()

    def send(self, payload: bytes, opcode: int = TEXT) -> None:
        assert self.link is not None
        self.link.send([payload], opcode)

    # -- protocol hooks -----------------------------------------------------------------

    def on_open(self) -> None:
        pass

    def frame(self, data: bytes) -> None:
        """A message from the server."""
        raise NotImplementedError

    def delivered(self, data: bytes) -> None:
        self.count += 1
        stats = self.stats
        stats.delivered += 1
        if stats.sample_every and stats.delivered % stats.sample_every == 0:
            t = stamp_of(data)
            if t is not None:
                stats.latencies.append(time.time() - t)

    def acked(self, ident: int) -> None:
        self.stats.acked += 1
        self.in_flight -= 1
        t0 = self.sent_at.pop(ident, None)
        if t0 is not None:
            self.stats.ack_latencies.append(time.perf_counter() - t0)
        if self.publishing:
            self.fill()

    # -- publishing ----------------------------------------------------------------------

    def publish_frame(self, ident: int, topic: int, payload: bytes) -> None:
        raise NotImplementedError

    def publish_one(self) -> None:
        """Publish one message, to the next of ``pub_topics`` in turn."""
        self.next_id += 1
        ident = self.next_id
        topic = ident % len(self.pub_topics)
        self.per_topic[topic] += 1
        self.in_flight += 1
        if self.track_acks:
            self.sent_at[ident] = time.perf_counter()
        self.publish_frame(ident, topic, stamp_payload(self.size))
        self.stats.published += 1

    def fill(self) -> None:
        """Keep ``window`` acknowledged publishes in flight (closed loop)."""
        while self.in_flight < self.window:
            self.publish_one()


class BrokerConn(Conn):
    """This project's protocol (docs/protocol.md)."""

    path = "/ws"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.state = 0  # 0 hello, 1 sub oks, 2 running
        self.pending = 0

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def frame(self, data: bytes) -> None:
        c = data[7]  # {"op":"m...
        if self.state == 2:
            if c == 109:  # m: msg
                self.delivered(data)
            elif c == 111:  # o: ok
                j = data.find(b'"id":') + 5
                k = j
                while 48 <= data[k] <= 57:
                    k += 1
                self.acked(int(data[j:k]))
            elif c == 101:  # e: error
                self.stats.errors += 1
                self.in_flight -= 1
                if self.publishing:
                    self.fill()
            return
        if self.state == 0:
            if data[:13] != b'{"op":"hello"':
                self.fail(f"unexpected first frame {data!r}")
                return
            self.state = 1
            for k, topic in enumerate(self.topics):
                self.send(b'{"op":"sub","id":%d,"topic":"%s"}' % (k, topic.encode()))
            self.pending = len(self.topics)
        elif c == 111:
            self.pending -= 1
        else:
            self.fail(f"subscribe failed: {data!r}")
            return
        if self.pending == 0:
            self.state = 2
            self.prefixes = [
                b'{"op":"pub","topic":"%s","data":"' % t.encode() for t in self.pub_topics
            ]
            self.ready.set_result(None)

    def publish_frame(self, ident: int, topic: int, payload: bytes) -> None:
        self.send(b'%s%s","id":%d}' % (self.prefixes[topic], payload, ident))


class SocketIOConn(Conn):
    """Socket.IO 4 (Engine.IO 4, WebSocket transport only)."""

    path = "/socket.io/?EIO=4&transport=websocket"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.state = 0  # 0 eio open, 1 sio connect, 2 joins, 3 running
        self.pending = 0

    def frame(self, data: bytes) -> None:
        c0 = data[0]
        if self.state == 3:
            if c0 == 52:  # '4': socket.io packet
                c1 = data[1]
                if c1 == 50 and data[2] == 91:  # 42[ : event without ack id
                    self.delivered(data)
                elif c1 == 51:  # 43<id>[ : ack
                    k = 2
                    while 48 <= data[k] <= 57:
                        k += 1
                    self.acked(int(data[2:k]))
                elif c1 == 52:
                    self.stats.errors += 1
            elif c0 == 50 and len(data) == 1:  # engine.io ping
                self.send(b"3")
            return
        if c0 == 50 and len(data) == 1:
            self.send(b"3")
            return
        if self.state == 0:
            if c0 != 48:  # '0' open
                self.fail(f"unexpected engine.io packet {data!r}")
                return
            self.state = 1
            self.send(b'40{"token":"%s"}' % self.token.encode())
        elif self.state == 1:
            if data[:2] != b"40":
                self.fail(f"socket.io connect refused: {data!r}")
                return
            self.state = 2
            for k, topic in enumerate(self.topics):
                self.send(b'42%d["join","%s"]' % (k, topic.encode()))
            self.pending = len(self.topics)
        elif self.state == 2:
            if data[:2] == b"43":
                self.pending -= 1
            else:
                return  # an event before our joins completed: ignore
        if self.state == 2 and self.pending == 0:
            self.state = 3
            self.prefixes = [
                b'["message",{"room":"%s","text":"' % t.encode() for t in self.pub_topics
            ]
            self.ready.set_result(None)

    def publish_frame(self, ident: int, topic: int, payload: bytes) -> None:
        self.send(b'42%d%s%s"}]' % (ident, self.prefixes[topic], payload))


class MqttConn(Conn):
    """MQTT 5 over WebSocket (binary frames, subprotocol ``mqtt``)."""

    path = "/mqtt"
    subprotocol = "mqtt"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.state = 0  # 0 connack, 1 suback, 2 running
        self.pending = 0
        self.mbuf = b""

    def on_open(self) -> None:
        cid = (self.user or os.urandom(6).hex()).encode()
        # protocol name, level 5, flags: clean start, keepalive 0 (none), no properties
        var = b"\x00\x04MQTT\x05\x02\x00\x00" + b"\x00"
        body = var + len(cid).to_bytes(2, "big") + cid
        self.send(b"\x10" + _varint(len(body)) + body, BINARY)

    def frame(self, message: bytes) -> None:
        # MQTT packets may span WebSocket messages: a partial one waits in mbuf.
        data = self.mbuf + message if self.mbuf else message
        self.mbuf = b""
        end = len(data)
        i = 0
        while end - i >= 2:
            ptype = data[i] >> 4
            # remaining length varint
            j = i + 1
            mult = 1
            rl = 0
            while True:
                if j >= end:
                    self.mbuf = data[i:end]
                    return
                b = data[j]
                rl += (b & 0x7F) * mult
                j += 1
                if b < 128:
                    break
                mult <<= 7
            pend = j + rl
            if pend > end:
                break
            if ptype == 3:
                self.delivered(data[j:pend])
            elif ptype == 4:
                self.acked((data[j] << 8) | data[j + 1])
            else:
                self.control(ptype, data, j, pend)
            i = pend
        if i < end:
            self.mbuf = data[i:end]

    def control(self, ptype: int, data: bytes, j: int, end: int) -> None:
        if ptype == 2 and self.state == 0:  # CONNACK
            if data[j + 1] != 0:
                self.fail(f"connack reason {data[j + 1]}")
                return
            self.state = 1
            for k, topic in enumerate(self.topics):
                t = topic.encode()
                # packet id, no properties, topic filter, options: QoS 0 | No Local
                body = (
                    (k + 1).to_bytes(2, "big") + b"\x00" + len(t).to_bytes(2, "big") + t + b"\x04"
                )
                self.send(b"\x82" + _varint(len(body)) + body, BINARY)
            self.pending = len(self.topics)
        elif ptype == 9 and self.state == 1:  # SUBACK
            self.pending -= 1
        elif ptype == 13:  # PINGRESP
            return
        if self.state == 1 and self.pending == 0:
            self.state = 2
            self.prefixes = [
                len(t.encode()).to_bytes(2, "big") + t.encode() for t in self.pub_topics
            ]
            self.ready.set_result(None)

    def publish_frame(self, ident: int, topic: int, payload: bytes) -> None:
        pid = (ident - 1) % 65535 + 1
        if self.track_acks:  # map back: acks come with the 16-bit packet id
            self.sent_at[pid] = self.sent_at.pop(ident)
        body = self.prefixes[topic] + pid.to_bytes(2, "big") + b"\x00" + payload
        self.send(b"\x32" + _varint(len(body)) + body, BINARY)


KINDS: dict[str, type[Conn]] = {"broker": BrokerConn, "socketio": SocketIOConn, "mqtt": MqttConn}


def new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else the default one."""
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``want``; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(max(soft, want), hard) if hard != resource.RLIM_INFINITY else max(soft, want)
    if new != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


async def open_many(
    kind: str,
    stats: Stats,
    host: str,
    port: int,
    specs: list[dict[str, object]],
    concurrency: int = 64,
    timeout: float = 60.0,
) -> list[Conn]:
    """Open one connection per spec (keyword arguments of the connection class), at most
    ``concurrency`` handshakes at a time, and wait until each is subscribed."""
    cls = KINDS[kind]
    gate = asyncio.Semaphore(concurrency)
    conns: list[Conn | None] = [None] * len(specs)

    async def one(k: int, spec: dict[str, object]) -> None:
        async with gate:
            for attempt in range(3):
                try:
                    conn = cls(stats, host, port, **spec)  # type: ignore[arg-type]
                    await conn.open(timeout)
                    conns[k] = conn
                    return
                except (ConnectionError, OSError):
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(one(k, s) for k, s in enumerate(specs)))
    return [c for c in conns if c is not None]


def close_all(conns: list[Conn]) -> None:
    for c in conns:
        c.abort()


async def wait_until(
    pred: Callable[[], bool], progress: Callable[[], int], *, idle: float = 3.0, limit: float = 60.0
) -> bool:
    """Wait until ``pred()`` holds, or ``progress()`` stops changing for ``idle`` seconds,
    or ``limit`` seconds pass. True when ``pred()`` held."""
    started = last_change = time.perf_counter()
    last = progress()
    while not pred():
        now = time.perf_counter()
        cur = progress()
        if cur != last:
            last, last_change = cur, now
        elif now - last_change > idle:
            return False
        if now - started > limit:
            return False
        await asyncio.sleep(0.01)
    return True
