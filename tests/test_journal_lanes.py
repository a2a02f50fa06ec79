"""Large publishes wait apart: with the SQLite store (fsync ``interval``) a publish of
256 KiB or more takes a lane of its own in the journal, small publishes still go to the
commit log while its tail is full, and each sender's publishes keep their order (real
SQLite store in a temporary directory, in-process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from broker.core.model import Draft, Message, now_ms
from broker.errors import BrokerError
from broker.server.journal import LARGE_PUBLISH, Journal
from broker.store.sqlite import SqliteStore
from broker.store.sqlite.syncer import TAIL_MAX_BYTES


def _draft(user: str, size: int, topic: str = "t") -> Draft:
    return Draft(topic, b"x" * size, user, user, now_ms())


async def test_a_full_tail_takes_small_batches_and_not_large_ones(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "broker.sqlite3", history=100, fsync_interval=3600)
    await store.open()
    try:
        assert store.separate_large
        store._syncer.tail_bytes = TAIL_MAX_BYTES + 1  # as if SQLite lagged behind
        assert store.append_now([_draft("a", 100_000)]) is None  # waits for SQLite
        made = store.append_now([_draft("b", 10)])
        assert made is not None and made[0].seq == 1
    finally:
        await store.close()


async def test_fsync_always_keeps_one_lane(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "broker.sqlite3", history=100, fsync="always")
    await store.open()
    try:
        assert not store.separate_large
        assert not Journal(store, lambda _: None).separate_large
    finally:
        await store.close()


async def test_large_publishes_keep_their_senders_order(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "broker.sqlite3", history=100, fsync_interval=3600)
    await store.open()
    committed: list[Message] = []
    acked: dict[str, int] = {}

    def on_committed(batch: list[tuple[Message, Draft]]) -> None:
        committed.extend(m for m, _ in batch)

    def ack(name: str) -> object:
        def done(msg: Message | None, error: BrokerError | None) -> None:
            assert error is None and msg is not None
            acked[name] = msg.seq

        return done

    journal = Journal(store, on_committed)
    assert journal.separate_large
    # SQLite lags behind: a large publish waits for it to take the tail (on its thread).
    store._syncer.tail_bytes = TAIL_MAX_BYTES + 1
    try:
        for name, user, size in [
            ("a-large", "a", LARGE_PUBLISH),
            ("b-small", "b", 10),
            ("a-small", "a", 10),  # after a's large one: waits in its lane
            ("a-large2", "a", LARGE_PUBLISH),
            ("c-small", "c", 10),
        ]:
            journal.submit(_draft(user, size, f"t/{name}"), ack(name))  # type: ignore[arg-type]
        for _ in range(500):
            if len(acked) == 5:
                break
            await asyncio.sleep(0.01)
        assert len(acked) == 5, acked
        assert acked["a-large"] < acked["a-small"] < acked["a-large2"]
        # The others' small publishes did not wait behind a's.
        assert max(acked["b-small"], acked["c-small"]) < acked["a-large"]
        seqs = [m.seq for m in committed]
        assert seqs == sorted(seqs) == list(range(1, 6))  # fanned out in seq order
        assert journal.pending == 0
    finally:
        await journal.close()
        await store.close()
