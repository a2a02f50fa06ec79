"""A history checker in the style of a linearizability checker, for fault tests.

Publishers send keyed publishes (retried with the same key until acknowledged) and
subscribers resume with ``since``/``epoch`` after every dropped connection, against one or
more broker URLs, while the test injects a fault. At the end ``History.check()`` verifies:

* every acknowledged message reached every subscriber exactly once, in seq order, with the
  seq its ``ok`` named, or that subscriber was told ``recovered: false`` after the message
  was first sent (the only honest way to lose it);
* a message reached a subscriber twice only across a ``recovered: false`` replay, or
  (counted as ``redelivered``) when a retried publish was recorded twice because history
  went back between its unacknowledged first attempt and the retry;
* no (epoch, seq) named two different messages: neither as delivered (the epoch being the
  one the subscriber's last ``ok`` named, which is the name a resuming client uses), nor as
  acknowledged to the publishers.

Use::

    checker = Checker([node.url], node.token, topic="chk")
    async with checker.running(publishers=2, subscribers=2):
        await checker.wait_acks(50)
        inject_the_fault()
        await checker.wait_acks(100)
    history = await checker.finish()      # final resume of every subscriber, then drain
    history.check()                       # AssertionError listing every violation
    print(history.figures())              # what clients saw, what was lost, the outage

A test that must control exactly what is published when (one commit-log record per
publish, a kill after the Nth acknowledgement) runs subscribers only
(``running(publishers=0)``), publishes itself and records each ``ok`` with
``checker.acknowledged(key, seq, sent, epoch=...)``; ``finish`` and ``check`` are the same.

``finish`` reconnects each subscriber and resumes it with its ``since``/``epoch``, then reads
until every acknowledged message arrived or ``drain`` seconds pass quietly; a fresh
subscriber reads what history retains (``since: 0``). The figures:
acknowledged and failed publish attempts (by error code), ``longest_wait`` (the longest a
publish waited from its first attempt to its ``ok``: the time without service), resumes,
``recovered: false`` answers, the epochs seen, the acknowledged messages that some
subscriber never received (``lost``) and those history no longer holds
(``gone_from_history``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

#: Seconds a publish waits for its answer before the publisher retries it.
REPLY_TIMEOUT = 3.0
#: Pause before retrying a refused or unanswered publish, or reconnecting.
RETRY_PAUSE = 0.05


@dataclass
class Ack:
    """One acknowledged publish: its key (also its data), the seq its ``ok`` named, when
    it was first sent and when the ``ok`` came; the epoch it was acknowledged in, when the
    publisher knew it ("" otherwise)."""

    key: str
    seq: int
    sent: float
    acked: float
    attempts: int
    duplicate: bool
    epoch: str = ""


@dataclass
class Event:
    """What a subscriber saw: ``ok`` (a sub answer: epoch, seq, recovered), ``msg`` (seq,
    data) or ``drop`` (the connection ended)."""

    kind: str
    at: float
    seq: int = 0
    data: str = ""
    epoch: str = ""
    recovered: bool = True


class _Conn:
    """One WebSocket to one of the URLs, authenticated."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    @classmethod
    async def open(cls, url: str, token: str) -> _Conn:
        ws = await asyncio.wait_for(connect(url, max_size=None, open_timeout=3), 4)
        await ws.send(orjson.dumps({"op": "auth", "token": token}).decode())
        conn = cls(ws)
        frame = await conn.recv(3)
        if frame.get("op") != "hello":
            await ws.close()
            raise ConnectionError(f"no hello: {frame}")
        return conn

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def recv(self, timeout: float) -> dict[str, Any]:
        frame = orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        assert isinstance(frame, dict)
        return frame

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2)


class _Endpoints:
    """The URLs, tried in turn after a failure."""

    def __init__(self, urls: list[str], start: int) -> None:
        self.urls = urls
        self.i = start % len(urls)

    def next(self) -> str:
        url = self.urls[self.i]
        self.i = (self.i + 1) % len(self.urls)
        return url


class Publisher:
    """Publishes ``<name>-<n>`` with that key, one at a time, each retried (same key,
    any URL) until acknowledged."""

    def __init__(self, checker: Checker, name: str, index: int) -> None:
        self.checker = checker
        self.name = name
        self.urls = _Endpoints(checker.urls, index)
        self.acks: list[Ack] = []
        self.errors: Counter[str] = Counter()
        self.conn: _Conn | None = None

    async def run(self, stop: asyncio.Event) -> None:
        for n in itertools.count():
            if stop.is_set():
                break
            key = f"{self.name}-{n}"
            sent = time.monotonic()
            attempts = 0
            while True:
                attempts += 1
                reply = await self._attempt(key)
                if reply is not None and reply.get("op") == "ok":
                    self.acks.append(
                        Ack(
                            key,
                            int(reply["seq"]),
                            sent,
                            time.monotonic(),
                            attempts,
                            bool(reply.get("duplicate")),
                        )
                    )
                    self.checker.acked += 1
                    break
                # Not acknowledged: it may or may not be recorded. Stop only between
                # publishes, unless the run is over for good (then it stays unacknowledged).
                if stop.is_set() and time.monotonic() - sent > self.checker.give_up:
                    return
                await asyncio.sleep(RETRY_PAUSE)
            if self.checker.interval:
                await asyncio.sleep(self.checker.interval)

    async def _attempt(self, key: str) -> dict[str, Any] | None:
        try:
            if self.conn is None:
                self.conn = await _Conn.open(self.urls.next(), self.checker.token(self.name))
            rid = next(self.conn.ids)
            await self.conn.send(
                {"op": "pub", "id": rid, "topic": self.checker.topic, "data": key, "key": key}
            )
            deadline = time.monotonic() + REPLY_TIMEOUT
            while True:
                frame = await self.conn.recv(max(deadline - time.monotonic(), 0.01))
                if frame.get("id") == rid:
                    if frame["op"] == "error":
                        self.errors[str(frame.get("code"))] += 1
                    return frame
        except Exception as exc:  # refused, dropped, unanswered: retry
            self.errors[type(exc).__name__] += 1
            if self.conn is not None:
                await self.conn.close()
            self.conn = None
            return None


class Subscriber:
    """Subscribes to the topic from seq 0 and resumes with ``since``/``epoch`` (the last
    seq it received and the epoch of its last ``ok``) after every dropped connection."""

    def __init__(self, checker: Checker, name: str, index: int) -> None:
        self.checker = checker
        self.name = name
        self.urls = _Endpoints(checker.urls, index + 1)
        self.events: list[Event] = []
        self.since = 0
        self.epoch: str | None = None
        self.conn: _Conn | None = None
        self.resumes = 0
        self.keys: set[str] = set()
        #: Set while the subscriber stays disconnected (``Checker.take_away``).
        self.away = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.away.is_set():
                await asyncio.sleep(RETRY_PAUSE)
                continue
            try:
                await self._session(stop)
            except Exception:  # any failure: a dropped connection, resume
                pass
            if self.conn is not None:
                await self.conn.close()
                self.conn = None
                self.events.append(Event("drop", time.monotonic()))
            if not stop.is_set():
                await asyncio.sleep(RETRY_PAUSE)

    async def _session(self, stop: asyncio.Event) -> None:
        self.conn = await _Conn.open(self.urls.next(), self.checker.token(self.name))
        rid = next(self.conn.ids)
        sub: dict[str, Any] = {"op": "sub", "id": rid, "topic": self.checker.topic}
        sub["since"] = self.since
        if self.epoch is not None:
            sub["epoch"] = self.epoch
        await self.conn.send(sub)
        self.resumes += 1
        while not stop.is_set() and not self.away.is_set():
            try:
                frame = await self.conn.recv(0.1)
            except TimeoutError:
                continue
            self._observe(frame, rid)

    def _observe(self, frame: dict[str, Any], rid: int) -> None:
        now = time.monotonic()
        if frame.get("op") == "ok" and frame.get("id") == rid:
            self.epoch = str(frame["epoch"])
            recovered = bool(frame["recovered"])
            self.events.append(Event("ok", now, int(frame["seq"]), "", self.epoch, recovered))
        elif frame.get("op") == "msg":
            seq, data = int(frame["seq"]), str(frame["data"])
            self.events.append(Event("msg", now, seq, data, self.epoch or ""))
            self.since = seq
            self.keys.add(data)
        elif frame.get("op") == "error" and frame.get("id") == rid:
            raise ConnectionError(f"sub refused: {frame}")

    async def finish(self, acked: set[str], drain: float) -> None:
        """Resume once more (as after a dropped connection), then read until every key in
        ``acked`` arrived, or nothing came for ``drain`` seconds."""
        if self.conn is not None:
            await self.conn.close()
            self.conn = None
            self.events.append(Event("drop", time.monotonic()))
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self.run(stop))
        start = seen = len(self.events)
        quiet_since = time.monotonic()
        deadline = time.monotonic() + max(drain * 10, 10)
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if len(self.events) != seen:
                seen, quiet_since = len(self.events), time.monotonic()
            answered = any(e.kind == "ok" for e in self.events[start:])
            if answered and acked <= self.keys:
                break
            if time.monotonic() - quiet_since > drain:
                break
        stop.set()
        await asyncio.wait_for(task, 5)
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


@dataclass
class History:
    """What the publishers got acknowledged and what each subscriber saw."""

    acks: list[Ack]
    subscribers: dict[str, list[Event]]
    errors: Counter[str] = field(default_factory=Counter)
    #: The keys a fresh subscriber read from history at the end (``since: 0``).
    retained: set[str] = field(default_factory=set)
    #: Keys delivered twice under two seqs, allowed (see ``violations``).
    redelivered: set[str] = field(default_factory=set)

    def violations(self) -> list[str]:
        """Everything that breaks the guarantees (empty: the run is correct).

        One allowance, counted in ``redelivered``: a publish whose first attempt Redis
        recorded and the nodes delivered, but whose ``ok`` never came (Redis died
        first), then lost when history went back (a new epoch), is recorded again by the
        retry; live subscribers get it twice, under two seqs. Nothing tells them."""
        out: list[str] = []
        by_key = {a.key: a for a in self.acks}
        named: dict[tuple[str, int], str] = {}
        # Two acks with one seq are fine only in two epochs. An ``ok`` carries no epoch:
        # when the run saw one epoch only, that is the proof; otherwise the deliveries
        # (``named`` below) show under which epoch each one was seen.
        epochs = {e.epoch for events in self.subscribers.values() for e in events if e.kind == "ok"}
        if len(epochs) == 1:
            acked_seq: dict[int, str] = {}
            for a in self.acks:
                other = acked_seq.setdefault(a.seq, a.key)
                if other != a.key:
                    out.append(f"seq {a.seq} acknowledged for {other} and {a.key} in one epoch")
        acked_named: dict[tuple[str, int], str] = {}
        for a in self.acks:
            if a.epoch:  # the publisher knew the epoch: the proof needs no delivery
                other = acked_named.setdefault((a.epoch, a.seq), a.key)
                if other != a.key:
                    out.append(
                        f"(epoch {a.epoch}, seq {a.seq}) acknowledged for {other} and {a.key}"
                    )
        for name, events in self.subscribers.items():
            last = 0
            told: list[float] = []  # when this subscriber heard recovered: false
            got: dict[str, list[tuple[int, float]]] = {}
            for e in events:
                if e.kind == "ok":
                    if not e.recovered:
                        told.append(e.at)
                        last = 0  # a replay from the start of what is retained
                elif e.kind == "msg":
                    if e.seq <= last:
                        out.append(f"{name}: seq {e.seq} ({e.data}) after seq {last}")
                    last = max(last, e.seq)
                    previous = got.setdefault(e.data, [])
                    ack = by_key.get(e.data)
                    rerecorded = (
                        ack is not None
                        and ack.attempts > 1
                        and len(epochs) > 1
                        and (e.seq != ack.seq or any(s != ack.seq for s, _ in previous))
                    )
                    if rerecorded:
                        self.redelivered.add(e.data)
                    elif previous and not any(previous[-1][1] < t <= e.at for t in told):
                        out.append(
                            f"{name}: {e.data} delivered twice (seqs "
                            f"{previous[-1][0]} and {e.seq}) without recovered: false"
                        )
                    previous.append((e.seq, e.at))
                    if ack is not None and ack.seq != e.seq and not told and not rerecorded:
                        out.append(
                            f"{name}: {e.data} acknowledged as seq {ack.seq}, "
                            f"delivered as seq {e.seq}"
                        )
                    other = named.setdefault((e.epoch, e.seq), e.data)
                    if other != e.data:
                        out.append(
                            f"{name}: (epoch {e.epoch}, seq {e.seq}) names both "
                            f"{other} and {e.data}"
                        )
            for a in self.acks:
                if a.key not in got and not any(t > a.sent for t in told):
                    out.append(
                        f"{name}: {a.key} (seq {a.seq}) acknowledged, never delivered, "
                        "and no recovered: false after it"
                    )
        return out

    def check(self) -> None:
        """AssertionError listing the violations (at most 20), with the figures."""
        found = self.violations()
        if found:
            more = f"\n... and {len(found) - 20} more" if len(found) > 20 else ""
            raise AssertionError(
                f"{len(found)} violation(s):\n"
                + "\n".join(found[:20])
                + more
                + f"\nfigures: {self.figures()}"
            )

    def lost(self) -> set[str]:
        """Acknowledged keys that some subscriber never received (it was told
        ``recovered: false``)."""
        return {
            a.key
            for events in self.subscribers.values()
            for a in self.acks
            if a.key not in {e.data for e in events if e.kind == "msg"}
        }

    def gone(self) -> set[str]:
        """Acknowledged keys that history no longer held at the end (a fresh reader
        cannot get them; live subscribers may have)."""
        return {a.key for a in self.acks} - self.retained

    def figures(self) -> dict[str, Any]:
        """What clients saw and what it cost (seconds rounded to 0.01)."""
        waits = [a.acked - a.sent for a in self.acks]
        oks = [e for events in self.subscribers.values() for e in events if e.kind == "ok"]
        return {
            "acked": len(self.acks),
            "duplicate_acks": sum(a.duplicate for a in self.acks),
            "failed_attempts": dict(self.errors),
            "longest_wait": round(max(waits, default=0.0), 2),
            "resumes": len(oks),
            "recovered_false": sum(not e.recovered for e in oks),
            "epochs": len({e.epoch for e in oks}),
            "lost": len(self.lost()),
            "gone_from_history": len(self.gone()),
            "redelivered": len(self.redelivered),
        }


class Checker:
    """Publishers and subscribers against ``urls`` (see the module's docstring)."""

    def __init__(
        self,
        urls: list[str],
        token: Callable[[str], str],
        topic: str = "chk",
        *,
        interval: float = 0.002,
        give_up: float = 10.0,
    ) -> None:
        self.urls = urls
        self.token = token
        self.topic = topic
        #: Pause between one publisher's publishes (spreads them over the fault).
        self.interval = interval
        #: At the end, how long a publisher keeps retrying its last unacknowledged publish.
        self.give_up = give_up
        self.publishers: list[Publisher] = []
        self.subscribers: list[Subscriber] = []
        self.acked = 0
        #: Acknowledgements of the caller's own publishes (``acknowledged``).
        self.own_acks: list[Ack] = []
        self._stop_pub = asyncio.Event()
        self._stop_sub = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def running(self, publishers: int = 2, subscribers: int = 2) -> AsyncIterator[Checker]:
        """Start the subscribers (each answered before any publish), then the publishers;
        on exit stop the publishers (their last publish is retried until acknowledged, or
        ``give_up`` seconds)."""
        loop = asyncio.get_running_loop()
        self.subscribers = [Subscriber(self, f"sub{i}", i) for i in range(subscribers)]
        sub_tasks = [loop.create_task(s.run(self._stop_sub)) for s in self.subscribers]
        deadline = time.monotonic() + 15
        while not all(any(e.kind == "ok" for e in s.events) for s in self.subscribers):
            if time.monotonic() > deadline:
                raise AssertionError("subscribers were not answered within 15 s")
            await asyncio.sleep(0.02)
        self.publishers = [Publisher(self, f"pub{i}", i) for i in range(publishers)]
        pub_tasks = [loop.create_task(p.run(self._stop_pub)) for p in self.publishers]
        self._tasks = sub_tasks
        try:
            yield self
        finally:
            self._stop_pub.set()
            await asyncio.wait_for(asyncio.gather(*pub_tasks), self.give_up + REPLY_TIMEOUT + 5)
            for p in self.publishers:
                if p.conn is not None:
                    await p.conn.close()

    async def take_away(self, name: str, timeout: float = 5.0) -> None:
        """Disconnect subscriber ``name`` and keep it away until ``come_back``: it then
        resumes from what it saw, so it must get what it missed from history (or be told
        ``recovered: false``), not live."""
        sub = next(s for s in self.subscribers if s.name == name)
        sub.away.set()
        deadline = time.monotonic() + timeout
        while sub.conn is not None:
            assert time.monotonic() < deadline, f"{name} did not disconnect in {timeout} s"
            await asyncio.sleep(0.01)

    def come_back(self, name: str) -> None:
        """Let subscriber ``name`` (``take_away``) resume."""
        next(s for s in self.subscribers if s.name == name).away.clear()

    def acknowledged(
        self,
        key: str,
        seq: int,
        sent: float,
        *,
        epoch: str = "",
        attempts: int = 1,
        duplicate: bool = False,
    ) -> None:
        """Record a publish of ``key`` (its data, on the checker's topic) that the caller
        made itself, first sent at ``sent`` (``time.monotonic()``) and acknowledged now
        with ``seq``, in ``epoch`` when known."""
        now = time.monotonic()
        self.own_acks.append(Ack(key, seq, sent, now, attempts, duplicate, epoch))
        self.acked += 1

    async def wait_acks(self, n: int, timeout: float = 20.0) -> None:
        """Wait until ``n`` publishes in all were acknowledged."""
        deadline = time.monotonic() + timeout
        while self.acked < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.acked} of {n} publishes acknowledged in {timeout}s")
            await asyncio.sleep(0.01)

    async def finish(self, drain: float = 1.5) -> History:
        """Stop the subscribers, resume each one last time and drain it; the history."""
        self._stop_sub.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 10)
        acks = [*self.own_acks, *(a for p in self.publishers for a in p.acks)]
        keys = {a.key for a in acks}
        audit = Subscriber(self, "audit", 0)
        await asyncio.gather(*(s.finish(keys, drain) for s in [*self.subscribers, audit]))
        errors: Counter[str] = Counter()
        for p in self.publishers:
            errors.update(p.errors)
        subscribers = {s.name: s.events for s in self.subscribers}
        return History(acks, subscribers, errors, audit.keys)
