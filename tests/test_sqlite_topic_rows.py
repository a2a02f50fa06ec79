"""The SQLite store forgets the topics whose messages retention removed: a pattern read
costs the topics that live, not every topic ever published to; a floor keeps
``recovered`` exact for the forgotten ones."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from broker.core.model import Draft
from broker.store.sqlite import SqliteStore


def _drafts(prefix: str, count: int) -> list[Draft]:
    now = int(time.time() * 1000)
    return [Draft(f"{prefix}/{i}", b"1", "u", "u", now) for i in range(count)]


def _topic_rows(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT count(*) FROM topics").fetchone()[0])
    finally:
        db.close()


async def test_topics_emptied_by_retention_are_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    store = SqliteStore(path, retention=60)
    await store.open()
    try:
        await store.append(_drafts("old", 5000))
        before = store.last_seq
        # An hour later every one of them is past retention.
        assert await store.trim(time.time() + 3600) == 5000
        assert _topic_rows(path) == 0
        pages = await store.replay("#", last=1, upto=store.last_seq)
        assert await pages.next() == []
        # A since below what retention removed is not recovered, whatever the pattern.
        replay = await store.read_since("old/7", 0, store.last_seq)
        assert replay.recovered is False
        pages = await store.replay("old/#", since=before - 1, upto=store.last_seq)
        assert pages.recovered is False
        # New topics live as before; a since from after the floor is recovered.
        await store.append(_drafts("new", 3))
        pages = await store.replay("new/#", since=before, upto=store.last_seq)
        assert pages.recovered is True
        assert [m.topic for m in await pages.next()] == ["new/0", "new/1", "new/2"]
        assert _topic_rows(path) == 3
    finally:
        await store.close()
    # The floor survives a restart: last_seq never goes back.
    again = SqliteStore(path, retention=60)
    await again.open()
    try:
        assert again.last_seq >= before + 3
        replay = await again.read_since("old/#", 0, again.last_seq)
        assert replay.recovered is False
    finally:
        await again.close()
