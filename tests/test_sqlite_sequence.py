"""The SQLite store's seq counter across restarts, in-process: after an unclean stop it
goes on after the durable reservation only when the machine may have lost power (another
boot id, given to the store as its ``boot_id``), never otherwise. The same with real
``broker serve`` processes and ``kill -9`` is in test_durability.py."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from broker.core.model import Draft
from broker.store.sqlite import SqliteStore
from broker.store.sqlite.store import SEQ_RESERVE


async def publish(path: Path, boot: str, n: int) -> list[int]:
    """Open the store as on machine boot ``boot``, publish ``n`` messages, close it."""
    store = SqliteStore(path, boot_id=boot, fsync_interval=3600)
    await store.open()
    try:
        made = store.append_now(
            [Draft("t", b"1", "u", "U", int(time.time() * 1000)) for _ in range(n)]
        )
        assert made is not None
        return [m.seq for m in made]
    finally:
        await store.close()


def as_if_killed(path: Path) -> int:
    """Make the last (clean) run look like one that was killed with its reservation
    unused; returns the reservation."""
    with sqlite3.connect(path) as db:
        (reserved,) = db.execute("SELECT max(seq) + ? FROM messages", (SEQ_RESERVE,)).fetchone()
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [("clean", "0"), ("reserved", str(reserved))],
        )
    return int(reserved)


async def test_after_a_kill_on_the_same_boot_the_sequence_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    assert await publish(path, "boot-1", 3) == [1, 2, 3]
    as_if_killed(path)
    assert await publish(path, "boot-1", 1) == [4]


async def test_after_a_reboot_the_sequence_goes_on_after_the_reservation(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    assert await publish(path, "boot-1", 3) == [1, 2, 3]
    reserved = as_if_killed(path)
    assert await publish(path, "boot-2", 1) == [reserved + 1]


async def test_after_a_clean_stop_a_reboot_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    assert await publish(path, "boot-1", 3) == [1, 2, 3]
    assert await publish(path, "boot-2", 1) == [4]


async def test_reservations_are_fsynced_ahead_by_the_fsync_thread(tmp_path: Path) -> None:
    """No fsync on the event loop but the first: each next reservation rides on the record
    that passes half of the current one, and the fsync thread makes it durable before the
    seqs reach it (it was one fsync on the loop per SEQ_RESERVE seqs, 1-30 ms each under
    load)."""
    store = SqliteStore(tmp_path / "broker.sqlite3", boot_id="b", fsync_interval=3600)
    await store.open()
    syncer = store._syncer
    try:
        batch = SEQ_RESERVE // 20
        for _ in range(60):  # three reservations' worth, in batches
            made = store.append_now(
                [Draft("t", b"1", "u", "U", int(time.time() * 1000)) for _ in range(batch)]
            )
            assert made is not None
            last = made[-1].seq
            deadline = time.monotonic() + 10
            # As a loop would: the fsync thread catches up between batches.
            while syncer.durable_reserved < store._reserved:
                assert time.monotonic() < deadline, "the reservation was not fsynced"
                await asyncio.sleep(0.005)
        assert last == 60 * batch
        assert syncer.loop_fsyncs == 1
        assert syncer.durable_reserved > last
    finally:
        await store.close()
    # Reopened as after a power loss: the sequence goes on past every seq given.
    reserved = as_if_killed(tmp_path / "broker.sqlite3")
    assert reserved > last
    assert await publish(tmp_path / "broker.sqlite3", "boot-2", 1) == [reserved + 1]
