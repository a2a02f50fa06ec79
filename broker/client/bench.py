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
from websockets.asyncio.client import ClientConnection, connect

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


async def _open(url: str, token: str) -> ClientConnection:
    ws = await connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        max_size=None,
        compression=None,
        open_timeout=30,
        ping_interval=None,
    )
    hello = orjson.loads(await ws.recv())
    if hello.get("op") != "hello":
        raise RuntimeError(f"unexpected first frame {hello}")
    return ws


class _Subscriber:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.count = 0
        self.latencies: list[float] = []

    async def run(self, sample_every: int) -> None:
        ws = self.ws
        async for raw in ws:
            self.count += 1
            if self.count % sample_every == 0:
                frame = orjson.loads(raw)
                if frame.get("op") == "msg":
                    self.latencies.append(time.time() - frame["data"]["t"])


async def run_bench(
    cfg: BenchConfig, progress: Callable[[int, int], None] | None = None
) -> BenchResult:
    """Run one benchmark against ``cfg.url`` and return the measurements."""
    result = BenchResult()
    topics = [f"bench/{i}" for i in range(cfg.topics)]
    pid = cfg.server_pid
    rss_before = proc_rss_bytes(pid) if pid else 0
    subs: list[_Subscriber] = []
    for i in range(cfg.subscribers):
        ws = await _open(cfg.url, cfg.token(f"sub{i}"))
        await ws.send(
            orjson.dumps({"op": "sub", "id": 1, "topic": topics[i % cfg.topics]}).decode()
        )
        ok = orjson.loads(await ws.recv())
        if ok.get("op") != "ok":
            raise RuntimeError(f"subscribe failed: {ok}")
        subs.append(_Subscriber(ws))
    if pid and cfg.subscribers:
        result.server_rss_mb = round(proc_rss_bytes(pid) / 2**20, 1)
        result.rss_per_connection_kib = round(
            (proc_rss_bytes(pid) - rss_before) / cfg.subscribers / 1024, 2
        )
    pubs = [await _open(cfg.url, cfg.token(f"pub{i}")) for i in range(cfg.publishers)]
    per_pub = cfg.messages // max(cfg.publishers, 1)
    total_msgs = per_pub * cfg.publishers
    published_per_topic = [0] * cfg.topics
    sample_every = max(1, total_msgs * max(cfg.subscribers, 1) // max(cfg.topics, 1) // 20000)
    sub_tasks = [asyncio.create_task(s.run(sample_every)) for s in subs]
    ack_latencies: list[float] = []
    padding = "x" * max(0, cfg.size - 40)
    cpu_before = proc_cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    interval = cfg.publishers / cfg.rate if cfg.rate else 0.0

    async def publisher(k: int, ws: ClientConnection) -> None:
        sent_at: dict[int, float] = {}
        window = asyncio.Semaphore(cfg.window)
        done = asyncio.Event()
        received = 0

        async def reader() -> None:
            nonlocal received
            async for raw in ws:
                frame = orjson.loads(raw)
                op = frame.get("op")
                if op == "ok":
                    t0 = sent_at.pop(frame["id"], None)
                    if t0 is not None:
                        ack_latencies.append(time.perf_counter() - t0)
                    result.acked += 1
                elif op == "error":
                    sent_at.pop(frame.get("id"), None)
                    result.errors += 1
                else:
                    continue
                received += 1
                window.release()
                if received >= per_pub:
                    done.set()
                    return

        read_task = asyncio.create_task(reader()) if cfg.acks else None
        next_at = time.perf_counter()
        for n in range(per_pub):
            if cfg.duration and time.perf_counter() - started > cfg.duration:
                break
            if cfg.acks:
                await window.acquire()
            t = (k + n) % cfg.topics
            published_per_topic[t] += 1
            frame: dict[str, Any] = {
                "op": "pub",
                "topic": topics[t],
                "data": {"t": time.time(), "p": padding},
            }
            if cfg.acks:
                frame["id"] = n
                sent_at[n] = time.perf_counter()
            await ws.send(orjson.dumps(frame).decode())
            result.published += 1
            if progress is not None and n % 256 == 0:
                progress(result.published, total_msgs)
            if interval:
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
        if read_task is not None:
            if result.published < total_msgs:
                done.set()
            await asyncio.wait_for(done.wait(), 60)
            read_task.cancel()

    await asyncio.gather(*(publisher(k, ws) for k, ws in enumerate(pubs)))
    if progress is not None:
        progress(result.published, total_msgs)
    expected = [published_per_topic[i % cfg.topics] for i in range(cfg.subscribers)]
    result.expected = sum(expected)
    # Wait until every subscriber has everything, or nothing arrives for 5 s.
    last_total, last_change = -1, time.perf_counter()
    while any(s.count < e for s, e in zip(subs, expected)):
        total = sum(s.count for s in subs)
        if total != last_total:
            last_total, last_change = total, time.perf_counter()
        elif time.perf_counter() - last_change > 5:
            break
        await asyncio.sleep(0.005)
    for task in sub_tasks:
        task.cancel()
    elapsed = time.perf_counter() - started
    result.seconds = round(elapsed, 3)
    result.delivered = sum(s.count for s in subs)
    result.publish_rate = round(result.published / elapsed, 1)
    result.delivery_rate = round(result.delivered / elapsed, 1)
    result.ack_latency_ms = percentiles(ack_latencies)
    result.delivery_latency_ms = percentiles([x for s in subs for x in s.latencies])
    if pid:
        cpu = proc_cpu_seconds(pid) - cpu_before
        result.server_cpu_seconds = round(cpu, 3)
        if result.delivered:
            result.server_cpu_per_delivery_us = round(cpu / result.delivered * 1e6, 3)
    await asyncio.gather(
        *(ws.close() for ws in pubs + [s.ws for s in subs]), return_exceptions=True
    )
    return result
