"""The SQLite store's reads: a read of one topic does not wait behind pattern reads over
many topics that other clients queued before it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from broker.core.model import Draft
from broker.store.sqlite import SqliteStore


async def test_a_one_topic_read_overtakes_queued_pattern_reads(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "broker.sqlite3")
    await store.open()
    try:
        now = int(time.time() * 1000)
        for start in range(0, 20_000, 5000):
            await store.append(
                [Draft(f"t/{i}", b"1", "u", "u", now) for i in range(start, start + 5000)]
            )
        await store.append([Draft("mine", b"2", "me", "me", now)])
        upto = store.last_seq
        # Eight clients' `sub` of '#' with last: 5, queued first.
        wide = [asyncio.create_task(store.read_last("#", 5, upto)) for _ in range(8)]
        await asyncio.sleep(0)
        mine = await store.read_last("mine", 5, upto)
        assert [m.payload for m in mine] == [b"2"]
        # The pattern reads were still being served when the one-topic read was answered.
        assert not all(task.done() for task in wide)
        newest = ["t/19996", "t/19997", "t/19998", "t/19999", "mine"]
        for got in await asyncio.gather(*wide):
            assert [m.topic for m in got] == newest
        pages = await store.replay("#", last=5, upto=upto)
        assert [m.topic for m in await pages.next()] == newest
        pages = await store.replay("t/+", last=3, upto=upto)
        assert [m.topic for m in await pages.next()] == newest[1:4]
    finally:
        await store.close()
