"""The cost of ``latest`` (section 9 of docs/protocol.md) over many topics and much history.

Fills a store with ``--messages`` retained messages spread evenly over ``--topics`` topics
(``scores/<n>``), then times ``store.latest("scores/#", upto)``: the most recent message
of each topic, read from the store's per-topic index (memory: the end of each topic's
deque; SQLite: ``max(seq)`` over the ``(topic, seq)`` index; Redis: the top of each
topic's ZSET). Its cost grows with the topics, not with the messages, which this shows by
also timing the same call at a tenth of the messages.

The SQLite database is written directly (one transaction, the store's own schema) rather
than through ``append``, so that filling a million rows takes seconds, not the benchmark's
whole budget; the store then opens it as it would after a restart.

    python benchmarks/latest.py                      # memory and SQLite, 1,000 topics, 1M messages
    python benchmarks/latest.py --stores sqlite --messages 100000
    python benchmarks/latest.py --stores redis --redis redis://127.0.0.1:6379/15   # FLUSHES it
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from broker.core.model import Draft
from broker.store.base import Store
from broker.store.memory import MemoryStore
from broker.store.sqlite import SqliteStore


def _rows(topics: int, messages: int, ts: int) -> list[tuple[int, str, bytes, str, str, int]]:
    return [
        (seq, f"scores/{seq % topics}", b'{"home":1,"away":0}', "u", "U", ts)
        for seq in range(1, messages + 1)
    ]


async def memory_store(topics: int, messages: int) -> Store:
    store = MemoryStore(history=messages, history_size=None)
    ts = int(time.time() * 1000)
    batch = 10_000
    for start in range(1, messages + 1, batch):
        store.append_now(
            [
                Draft(f"scores/{seq % topics}", b'{"home":1,"away":0}', "u", "U", ts)
                for seq in range(start, min(start + batch, messages + 1))
            ]
        )
    return store


async def sqlite_store(folder: Path, topics: int, messages: int) -> Store:
    path = folder / "broker.sqlite3"
    store = SqliteStore(path, history=messages)
    await store.open()  # creates the schema
    await store.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
        _rows(topics, messages, int(time.time() * 1000)),
    )
    db.executemany(
        "INSERT OR IGNORE INTO topics VALUES (?, 0)", [(f"scores/{n}",) for n in range(topics)]
    )
    db.execute("COMMIT")
    db.close()
    store = SqliteStore(path, history=messages)
    await store.open()
    return store


async def redis_store(url: str, topics: int, messages: int) -> Store:
    """A Redis store filled through its own append script (a flushed database)."""
    from redis.asyncio import Redis

    from broker.store.redis.store import RedisStore

    flusher = Redis.from_url(url)
    await flusher.flushdb()
    await flusher.aclose()
    store = RedisStore(url, history=messages)
    await store.open()
    ts = int(time.time() * 1000)
    batch = 2000
    for start in range(1, messages + 1, batch):
        found = await store.append(
            [
                Draft(f"scores/{seq % topics}", b'{"home":1,"away":0}', "u", "U", ts)
                for seq in range(start, min(start + batch, messages + 1))
            ]
        )
        store.last_seq = found[-1].seq  # (a node learns it by following the stream)
    return store


async def measure(store: Store, rounds: int) -> tuple[float, float, int]:
    """Median and best milliseconds of one ``latest`` call, and how many it returned."""
    times = []
    found = []
    for _ in range(rounds):
        began = time.perf_counter()
        found = await store.latest("scores/#", store.last_seq)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), min(times), len(found)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--stores", default="memory,sqlite", help="memory, sqlite, redis")
    parser.add_argument("--redis", default=None, help="Redis URL for the redis store (flushed!)")
    args = parser.parse_args()
    print(f"latest over {args.topics:,} topics; median (best) of {args.rounds} calls")
    for name in args.stores.split(","):
        for messages in (args.messages // 10, args.messages):
            with tempfile.TemporaryDirectory() as tmp:
                began = time.perf_counter()
                if name == "memory":
                    store = await memory_store(args.topics, messages)
                elif name == "redis":
                    if not args.redis:
                        parser.error("--stores redis needs --redis URL")
                    store = await redis_store(args.redis, args.topics, messages)
                else:
                    store = await sqlite_store(Path(tmp), args.topics, messages)
                filled = time.perf_counter() - began
                median, best, count = await measure(store, args.rounds)
                await store.close()
            print(
                f"{name:>7} {messages:>9,} messages: {median:7.2f} ms ({best:.2f}), "
                f"{count} returned, {median * 1000 / args.topics:.1f} µs per topic "
                f"[filled in {filled:.1f}s]"
            )


if __name__ == "__main__":
    asyncio.run(main())
