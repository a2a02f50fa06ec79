"""The memory store's ``history_size`` bounds what it really holds (messages, topics,
idempotency keys) within a stated factor, whether or not the messages were sent (their
frames built), and expired keys go a slice at a time (in-process, no server)."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc

import pytest

from broker.core.model import Draft
from broker.store.dedupe import Duplicate
from broker.store.memory import KEY_SLICE, MemoryStore

from .support import wait_for

#: The factor docs/operations.md states: real bytes / history_size.
FACTOR = 1.5


def _drafts(start: int, count: int, topics: int, keyed: bool = False) -> list[Draft]:
    return [
        Draft(
            topic=f"t/{(start + i) % topics}",
            payload=b"1",
            sender_id="u1",
            sender_name="u1",
            ts=int(time.time() * 1000),
            key=f"k{start + i}" if keyed else None,
            group=1 if keyed else 0,
        )
        for i in range(count)
    ]


def _held(limit: int, topics: int, count: int, keyed: bool = False) -> tuple[int, MemoryStore]:
    """Bytes a store bounded by ``limit`` holds after ``count`` tiny messages, each sent
    (its frames built, as a delivery does)."""
    gc.collect()
    tracemalloc.start()
    try:
        store = MemoryStore(history=1000, history_size=limit)
        store.dedupe_window = 120
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, count, 1000):
            for msg in store.append_now(_drafts(start, 1000, topics, keyed)):
                assert msg.wire
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, store
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_tiny_messages_on_few_topics_stay_within_the_factor() -> None:
    limit = 2 << 20
    held, store = _held(limit, 100, 50_000)
    assert store.size <= limit
    assert held <= FACTOR * limit, f"{held / limit:.2f} x history_size"


def test_one_message_per_topic_stays_within_the_factor() -> None:
    limit = 2 << 20
    held, store = _held(limit, 1_000_000, 30_000)
    assert held <= FACTOR * limit, f"{held / limit:.2f} x history_size"
    # Topics whose messages went were forgotten, oldest first; 'floor' answers for them.
    assert store.floor > 0
    replay = asyncio.run(store.read_since("t/0", 0, store.last_seq))
    assert replay.recovered is False and replay.messages == []


@pytest.mark.slow
def test_keys_count_and_take_at_most_a_quarter() -> None:
    limit = 2 << 20
    held, store = _held(limit, 100, 30_000, keyed=True)
    assert store.keys_size <= limit // 4
    assert held <= FACTOR * limit, f"{held / limit:.2f} x history_size"


@pytest.mark.slow
def test_expired_keys_go_a_slice_at_a_time() -> None:
    store = MemoryStore(history=10)
    store.dedupe_window = 3.0  # longer than the appends below take
    count = 3 * KEY_SLICE
    for start in range(0, count, 1000):
        store.append_now(_drafts(start, 1000, 10, keyed=True))
    expired = time.monotonic() + store.dedupe_window
    wait_for(lambda: time.monotonic() > expired, timeout=10)
    # Every key has expired now; one trim call drops one slice of them, not all.
    asyncio.run(store.trim(time.time()))
    assert count - len(store._keys) == KEY_SLICE
    # New keys push expired ones out as they come, more than they add.
    store.append_now(_drafts(count, 1000, 10, keyed=True))
    assert len(store._keys) <= count - KEY_SLICE
    # An expired key is no duplicate, whether its entry is still there or not.
    [again] = store.append_now(_drafts(0, 1, 10, keyed=True))
    assert not isinstance(again, Duplicate)
