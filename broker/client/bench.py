"""Load generation for ``broker bench``: publishers and subscribers over real sockets.

Publishers keep up to ``window`` acknowledged publishes in flight each (or send without
ids with ``acks=False``), optionally paced to ``rate`` messages per second in total.
Subscribers count deliveries and sample end-to-end latency from a send time carried in
each message. When the broker runs on this machine (its pid is known), the server's CPU
time and RSS are read from ``/proc`` before and after, giving CPU per delivery and memory
per connection.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from broker.client.link import Link

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class BenchConfig:
    """One benchmark run."""

    url: str
    token: Callable[[str], str]
    publishers: int = 1
    subscribers: int = 10
    messages: int = 10_000
    size: int = 100
    rate: float | None = None
    topics: int = 1
    acks: bool = True
    window: int = 100
    duration: float | None = None
    server_pid: int | None = None


@dataclass
class BenchResult:
    """What a run measured."""

    published: int = 0
    acked: int = 0
    errors: int = 0
    delivered: int = 0
    expected: int = 0
    seconds: float = 0.0
    publish_rate: float = 0.0
    delivery_rate: float = 0.0
    ack_latency_ms: dict[str, float] = field(default_factory=dict)
    delivery_latency_ms: dict[str, float] = field(default_factory=dict)
    server_cpu_seconds: float | None = None
    server_cpu_per_delivery_us: float | None = None
    server_rss_mb: float | None = None
    rss_per_connection_kib: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of ``samples`` (seconds) in milliseconds."""
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": round(ordered[-1] * 1000, 3),
        "mean": round(statistics.fmean(ordered) * 1000, 3),
    }


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


async def _open(url: str, token: str, on_message: Callable[[bytes], None]) -> Link:
    """A lean connection, authenticated, past the broker's ``hello``; then every message
    goes to ``on_message``."""
    hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def receive(raw: bytes) -> None:
        if hello.done():
            on_message(raw)
            return
        frame = orjson.loads(raw)
        if frame.get("op") == "hello":
            hello.set_result(None)
        else:
            hello.set_exception(RuntimeError(f"unexpected first frame {frame}"))

    link = await Link.open(url, {"Authorization": f"Bearer {token}"}, receive)
    await asyncio.wait_for(hello, 30)
    return link


async def run_bench(
    cfg: BenchConfig, progress: Callable[[int, int], None] | None = None
) -> BenchResult:
    """Run one benchmark against ``cfg.url`` and return the measurements."""
    result = BenchResult()
    topics = [f"bench/{i}" for i in range(cfg.topics)]
    pid = cfg.server_pid
    rss_before = proc_rss_bytes(pid) if pid else 0
    loop = asyncio.get_running_loop()
    counts = [0] * cfg.subscribers
    latencies: list[float] = []
    sample_every = 1  # set once the totals are known, before anything is published
    subs: list[Link] = []
    for i in range(cfg.subscribers):
        subscribed: asyncio.Future[dict[str, Any]] = loop.create_future()

        def on_delivery(
            raw: bytes, i: int = i, subscribed: asyncio.Future[dict[str, Any]] = subscribed
        ) -> None:
            if not subscribed.done():
                subscribed.set_result(orjson.loads(raw))
                return
            n = counts[i] = counts[i] + 1
            if n % sample_every == 0:
                frame = orjson.loads(raw)
                if frame.get("op") == "msg":
                    latencies.append(time.time() - frame["data"]["t"])

        link = await _open(cfg.url, cfg.token(f"sub{i}"), on_delivery)
        link.send([orjson.dumps({"op": "sub", "id": 1, "topic": topics[i % cfg.topics]})])
        ok = await asyncio.wait_for(subscribed, 30)
        if ok.get("op") != "ok":
            raise RuntimeError(f"subscribe failed: {ok}")
        subs.append(link)
    if pid and cfg.subscribers:
        result.server_rss_mb = round(proc_rss_bytes(pid) / 2**20, 1)
        result.rss_per_connection_kib = round(
            (proc_rss_bytes(pid) - rss_before) / cfg.subscribers / 1024, 2
        )
    per_pub = cfg.messages // max(cfg.publishers, 1)
    total_msgs = per_pub * cfg.publishers
    published_per_topic = [0] * cfg.topics
    sample_every = max(1, total_msgs * max(cfg.subscribers, 1) // max(cfg.topics, 1) // 20000)
    ack_latencies: list[float] = []
    padding = "x" * max(0, cfg.size - 40)
    interval = cfg.publishers / cfg.rate if cfg.rate else 0.0
    publishers = [_Publisher(result, ack_latencies) for _ in range(cfg.publishers)]
    for k, publisher in enumerate(publishers):
        publisher.link = await _open(cfg.url, cfg.token(f"pub{k}"), publisher.received)
    cpu_before = proc_cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()

    def frame(k: int, n: int) -> bytes:
        t = (k + n) % cfg.topics
        published_per_topic[t] += 1
        body: dict[str, Any] = {
            "op": "pub",
            "topic": topics[t],
            "data": {"t": time.time(), "p": padding},
        }
        if cfg.acks:
            body["id"] = n
        return orjson.dumps(body)

    async def publish(k: int, publisher: _Publisher) -> None:
        link = publisher.link
        assert link is not None
        n = 0
        next_at = time.perf_counter()
        while n < per_pub:
            if cfg.duration and time.perf_counter() - started > cfg.duration:
                break
            if interval:
                count = 1
            elif cfg.acks:
                count = min(cfg.window - publisher.in_flight, per_pub - n)
                if count <= 0:
                    await publisher.room()
                    continue
            else:
                count = min(cfg.window, per_pub - n)
            frames = [frame(k, n + i) for i in range(count)]
            now = time.perf_counter()
            if cfg.acks:
                for i in range(count):
                    publisher.sent_at[n + i] = now
                publisher.in_flight += count
            link.send(frames)
            n += count
            result.published += count
            if progress is not None and n % 256 < count:
                progress(result.published, total_msgs)
            await link.drain()
            if interval:
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif not cfg.acks:
                await asyncio.sleep(0)  # let the acks-less stream interleave with reads
        if cfg.acks:
            await publisher.finished(n)

    await asyncio.gather(*(publish(k, p) for k, p in enumerate(publishers)))
    if progress is not None:
        progress(result.published, total_msgs)
    expected = [published_per_topic[i % cfg.topics] for i in range(cfg.subscribers)]
    result.expected = sum(expected)
    # Wait until every subscriber has everything, or nothing arrives for 5 s.
    last_total, last_change = -1, time.perf_counter()
    while any(c < e for c, e in zip(counts, expected)):
        total = sum(counts)
        if total != last_total:
            last_total, last_change = total, time.perf_counter()
        elif time.perf_counter() - last_change > 5:
            break
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    result.seconds = round(elapsed, 3)
    result.delivered = sum(counts)
    result.publish_rate = round(result.published / elapsed, 1)
    result.delivery_rate = round(result.delivered / elapsed, 1)
    result.ack_latency_ms = percentiles(ack_latencies)
    result.delivery_latency_ms = percentiles(latencies)
    if pid:
        cpu = proc_cpu_seconds(pid) - cpu_before
        result.server_cpu_seconds = round(cpu, 3)
        if result.delivered:
            result.server_cpu_per_delivery_us = round(cpu / result.delivered * 1e6, 3)
    links = [p.link for p in publishers if p.link is not None] + subs
    await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
    return result


class _Publisher:
    """One publishing connection's acknowledgements: what is in flight, since when."""

    def __init__(self, result: BenchResult, latencies: list[float]) -> None:
        self.link: Link | None = None
        self.sent_at: dict[int, float] = {}
        self.in_flight = 0
        self.answered = 0
        self._result = result
        self._latencies = latencies
        self._wake: asyncio.Future[None] | None = None

    def received(self, raw: bytes) -> None:
        frame = orjson.loads(raw)
        op = frame.get("op")
        if op == "ok":
            t0 = self.sent_at.pop(frame.get("id"), None)
            if t0 is not None:
                self._latencies.append(time.perf_counter() - t0)
            self._result.acked += 1
        elif op == "error":
            self.sent_at.pop(frame.get("id"), None)
            self._result.errors += 1
        else:
            return
        self.in_flight -= 1
        self.answered += 1
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def room(self) -> None:
        """Wait for the next acknowledgement (or error); ``ConnectionError`` when the
        connection is lost, ``TimeoutError`` after 60 s without one."""
        assert self.link is not None
        wake = self._wake = asyncio.get_running_loop().create_future()
        try:
            done, _ = await asyncio.wait(
                (wake, self.link.closed), timeout=60, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self._wake = None
            wake.cancel()
        if wake in done:
            return
        if self.link.closed in done:
            raise ConnectionError(f"connection lost (close code {self.link.close_code})")
        raise TimeoutError("no acknowledgement for 60 s")

    async def finished(self, sent: int) -> None:
        """Wait until all ``sent`` publishes are answered."""
        while self.answered < sent:
            await self.room()


def run(cfg: BenchConfig, progress: Callable[[int, int], None] | None = None) -> BenchResult:
    """``run_bench`` in a new event loop: uvloop's when installed (a load generator should
    cost less than what it measures), asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.run(run_bench(cfg, progress))
    return uvloop.run(run_bench(cfg, progress))
