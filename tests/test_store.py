"""The stores (memory, SQLite, Redis) behind the same interface, and the journal's group
commit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.core.model import Draft, Message
from broker.errors import BrokerError, Unavailable
from broker.server.journal import Journal
from broker.store.base import Replay, Store, Visible
from broker.store.memory import MemoryStore
from broker.store.sqlite import SqliteStore

from .support import RedisServer


def draft(topic: str, n: int, ts: int | None = None) -> Draft:
    return Draft(
        topic, str(n).encode(), "u", "U", ts if ts is not None else int(time.time() * 1000)
    )


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Each store behind the same interface: the contract tests below run on all three
    (Redis: the session's redis-server, flushed; skipped without one unless CI=true)."""
    s: Store
    if request.param == "memory":
        s = MemoryStore(history=3)
    elif request.param == "sqlite":
        s = SqliteStore(tmp_path / "db", history=3)
    else:
        from broker.store.redis.store import RedisStore

        server: RedisServer = request.getfixturevalue("redis_server")
        server.ensure_running()
        server.flush()
        s = RedisStore(server.url, history=3)
    await s.open()
    yield s
    await s.close()


async def test_append_assigns_increasing_seqs(store: Store) -> None:
    msgs = await store.append([draft("a", 1), draft("b", 2)])
    more = await store.append([draft("a", 3)])
    assert [m.seq for m in msgs + more] == [1, 2, 3]
    assert store.epoch
    if not store.shared:  # a shared store's last_seq is what ``follow`` has fed this node
        assert store.last_seq == 3


async def test_reads(store: Store) -> None:
    await store.append([draft("x/a", i) if i % 2 else draft("x/b", i) for i in range(6)])
    await store.append([draft("y", 9)])
    since = await store.read_since("x/+", 2, 100)
    assert [m.seq for m in since.messages] == [3, 4, 5, 6] and since.recovered
    assert [m.seq for m in (await store.read_since("x/+", 2, 4)).messages] == [3, 4]
    assert [m.seq for m in await store.read_last("x/#", 2, 100)] == [5, 6]
    assert [m.seq for m in await store.read_last("x/a", 2, 5)] == [2, 4]
    assert await store.read_last("nothing/+", 5, 100) == []
    assert await store.read_last("#", 0, 100) == []


async def test_count_retention_sets_recovered(store: Store) -> None:
    await store.append([draft("t", i) for i in range(5)])  # history=3 keeps 3, 4, 5
    result = await store.read_since("t", 0, 100)
    assert [m.seq for m in result.messages] == [3, 4, 5] and not result.recovered
    assert (await store.read_since("t", 2, 100)).recovered
    assert not (await store.read_since("t", 1, 100)).recovered


async def test_age_retention(store: Store) -> None:
    old = int((time.time() - 100) * 1000)
    await store.append([draft("t", 1, ts=old), draft("t", 2)])
    store.retention = 50
    assert await store.trim(time.time()) == 1
    result = await store.read_since("t", 0, 100)
    assert [m.seq for m in result.messages] == [2] and not result.recovered


@pytest.mark.parametrize("expired", [0, 1, 17, 29, 40])
async def test_age_retention_boundary_with_gaps(store: Store, expired: int) -> None:
    # 40 messages over 4 topics in publish order; count retention (3 per topic) leaves
    # gaps in seq. The first `expired` are older than the retention.
    now = time.time()
    stamps = [
        int((now - 100) * 1000) + i if i < expired else int(now * 1000) + i for i in range(40)
    ]
    for i in range(0, 40, 7):  # a few commit batches
        await store.append([draft(f"t{j % 4}", j, ts=stamps[j]) for j in range(i, min(i + 7, 40))])
    store.retention = 50
    before = {m.seq for m in (await store.read_since("#", 0, 100)).messages}
    removed = await store.trim(now)
    after = {m.seq for m in (await store.read_since("#", 0, 100)).messages}
    assert after == {seq for seq in before if seq > expired}
    assert removed == len(before) - len(after)


async def test_sqlite_drops_the_old_ts_index(tmp_path: Path) -> None:
    import sqlite3

    s = SqliteStore(tmp_path / "db")
    await s.open()
    await s.close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("CREATE INDEX messages_ts ON messages (ts)")  # as databases from before had
    db.commit()
    db.close()
    again = SqliteStore(tmp_path / "db")
    await again.open()
    await again.close()
    db = sqlite3.connect(tmp_path / "db")
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    db.close()
    assert "messages_ts" not in names and "messages_topic_seq" in names


async def test_sqlite_reopen_keeps_epoch_and_counter(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "db", history=1, retention=50)
    await s.open()
    await s.append([draft("t", 1, ts=0), draft("t", 2, ts=0)])
    await s.trim(time.time())  # everything expired
    epoch = s.epoch
    await s.close()
    again = SqliteStore(tmp_path / "db", history=1)
    await again.open()
    assert again.epoch == epoch and again.last_seq == 2
    assert [m.seq for m in await again.append([draft("t", 3)])] == [3]
    await again.close()


class FailingStore(Store):
    """A store whose disk is gone: every append fails. (On the interface, not on
    MemoryStore: the compiled build's classes cannot be subclassed in Python.)"""

    def append_now(self, drafts: list[Draft]) -> list[Message] | None:
        return None  # not at once: through append, the path a task awaits

    async def append(self, drafts: list[Draft]) -> list[Message]:
        raise OSError("disk I/O error")

    async def read_since(self, pattern: str, since: int, upto: int) -> Replay:
        raise OSError("disk I/O error")

    async def read_last(self, pattern: str, n: int, upto: int) -> list[Message]:
        raise OSError("disk I/O error")

    async def trim(self, now: float) -> int:
        return 0

    async def latest(
        self, pattern: str, upto: int, limit: int = 0, visible: Visible = None
    ) -> list[Message]:
        raise OSError("disk I/O error")


async def test_journal_refuses_with_unavailable_when_store_fails() -> None:
    journal = Journal(FailingStore(), lambda committed: None)
    results: list[BrokerError | None] = []
    for i in range(3):
        journal.submit(draft("t", i), lambda m, e: results.append(e))
    await journal.close()
    assert len(results) == 3 and all(isinstance(e, Unavailable) for e in results)


async def test_journal_batches_while_a_commit_runs() -> None:
    store = MemoryStore()
    sizes: list[int] = []
    fanned: list[int] = []
    journal = Journal(store, lambda committed: fanned.extend(m.seq for m, _ in committed))
    journal.commit_observers.append(lambda n, _: sizes.append(n))
    done: list[int] = []
    for i in range(10):
        journal.submit(draft("t", i), lambda m, e: done.append(m.seq if m else -1))
    await asyncio.sleep(0)  # one loop turn: the first commit is now running
    for i in range(10):
        journal.submit(draft("t", i), lambda m, e: done.append(m.seq if m else -1))
    await journal.close()
    assert done == list(range(1, 21)) and fanned == done
    assert sum(sizes) == 20 and len(sizes) <= 3  # batched, not one commit per message
    refused: list[BrokerError | None] = []
    journal.submit(draft("t", 0), lambda m, e: refused.append(e))
    assert isinstance(refused[0], Unavailable)
