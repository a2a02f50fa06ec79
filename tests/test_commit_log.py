"""The SQLite store's commit log (``fsync = interval``): records, torn tails, recovery,
and the store reading what only the log holds yet. Real files, in-process stores; the
``kill -9`` of a real broker is in test_durability.py."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from broker.core.model import Draft, Message
from broker.errors import Unavailable
from broker.store.dedupe import Duplicate
from broker.store.sqlite import SqliteStore
from broker.store.sqlite.commitlog import (
    Batch,
    CommitLog,
    decode,
    encode,
    read_segment,
    scan_segment,
)


def draft(topic: str, n: int, key: str | None = None) -> Draft:
    return Draft(topic, str(n).encode(), "u", "Ü", int(time.time() * 1000), key=key)


def batch(*seqs: int) -> Batch:
    return Batch(
        [Message(s, f"t/é{s}", b'{"n":%d}' % s, "u", "Ünïcode", 1000 + s) for s in seqs],
        [("u", "k\u2603", "1,2", 99)],
        reserved=7,
    )


def test_a_record_round_trips() -> None:
    b = batch(1, 2)
    record = encode(b)
    assert decode(record[8:]) == b
    assert read_segment(record * 3) == [b, b, b]


def test_a_torn_or_damaged_record_ends_the_segment() -> None:
    one, two = encode(batch(1)), encode(batch(2))
    assert read_segment(one + two[:-1]) == [batch(1)]  # cut in the middle of a write
    damaged = bytearray(two)
    damaged[-1] ^= 0xFF
    assert read_segment(one + bytes(damaged) + one) == [batch(1)]
    assert read_segment(one + b"\x00" * 3) == [batch(1)]


def test_segments_rotate_and_recover_in_order(tmp_path: Path) -> None:
    log = CommitLog(tmp_path, "db-log")
    log.start()
    log.append(encode(batch(1)))
    log.prepare()
    finished = log.rotate()
    assert finished is not None
    os.close(finished[1])
    log.append(encode(batch(2)))
    log.append(encode(batch(3)))
    log.close()
    again = CommitLog(tmp_path, "db-log")
    assert [m.seq for b in again.recover().batches for m in b.messages] == [1, 2, 3]
    again.remove_upto(finished[0])
    assert [m.seq for b in again.recover().batches for m in b.messages] == [2, 3]


async def open_store(path: Path, interval: float = 3600.0) -> SqliteStore:
    store = SqliteStore(path / "broker.sqlite3", history=100, fsync_interval=interval)
    await store.open()
    return store


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("broker.sqlite3-log.*"))


async def test_reads_see_what_only_the_log_holds(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        made = store.append_now([draft("a", 1), draft("b", 2), draft("a", 3)])
        assert made is not None and [m.seq for m in made] == [1, 2, 3]
        # Nothing applied yet (a one-hour interval): the database has no message.
        with sqlite3.connect(tmp_path / "broker.sqlite3") as db:
            assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
        replay = await store.read_since("a", 0, 3)
        assert [m.payload for m in replay.messages] == [b"1", b"3"]
        last = await store.read_last("#", 2, 3)
        assert [m.seq for m in last] == [2, 3]
        pages = await store.replay("#", since=0, upto=3)
        assert [m.seq for m in await pages.next()] == [1, 2, 3]
    finally:
        await store.close()
    # A clean close applies everything and leaves no segment behind.
    assert segments(tmp_path) == []


async def test_a_broker_killed_before_the_apply_loses_nothing(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    made = store.append_now([draft("a", 1), draft("a", 2, key="k1")])
    assert made is not None
    # As after kill -9: SQLite never got the batch; the log segment is all there is.
    assert store._syncer.log is not None
    store._syncer.log.close()
    assert segments(tmp_path)
    again = SqliteStore(tmp_path / "broker.sqlite3", history=100)
    store._lock.release()  # the killed process's lock would die with it
    await again.open()
    try:
        replay = await again.read_since("a", 0, 10)
        assert [(m.seq, m.payload) for m in replay.messages] == [(1, b"1"), (2, b"2")]
        # The key came back with its message: a retry is still answered as a duplicate.
        dup = again.append_now([draft("a", 9, key="k1")])
        assert dup is not None and type(dup[0]) is Duplicate and dup[0].seqs == (2,)
        fresh = again.append_now([draft("a", 3)])
        assert fresh is not None and fresh[0].seq == 3
    finally:
        await again.close()


async def test_keys_are_found_in_the_log_and_after_the_apply(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        first = store.append_now([draft("a", 1, key="k")])
        assert first is not None and first[0].seq == 1
        in_tail = store.append_now([draft("a", 1, key="k")])
        assert in_tail is not None and type(in_tail[0]) is Duplicate
        await store.read_since("a", 0, 1)  # applies the log
        assert store._syncer.applied_seq == 1
        in_db = store.append_now([draft("a", 1, key="k")])
        assert in_db is not None and type(in_db[0]) is Duplicate and in_db[0].seqs == (1,)
    finally:
        await store.close()


async def test_the_fsync_thread_applies_and_removes_the_log(tmp_path: Path) -> None:
    store = await open_store(tmp_path, interval=0.05)
    try:
        assert store.append_now([draft("a", 1)]) is not None

        def applied() -> bool:
            # Only the segment being written remains, and it is empty.
            left = segments(tmp_path)
            return len(left) <= 2 and all(p.stat().st_size == 0 for p in left)

        deadline = time.monotonic() + 10
        while not applied() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert applied() and store._syncer.applied_seq == 1
        with sqlite3.connect(tmp_path / "broker.sqlite3") as db:
            assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    finally:
        await store.close()


async def test_a_failed_log_write_acknowledges_nothing(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        assert store.append_now([draft("a", 1)]) is not None
        log = store._syncer.log
        assert log is not None and log._fd is not None
        os.close(log._fd)  # every write now fails, as on a broken disk
        log._fd = os.open(os.devnull, os.O_RDONLY)
        with pytest.raises(Unavailable):
            store.append_now([draft("a", 2)])
        assert store.last_seq == 1
    finally:
        store._failure = None
        log = store._syncer.log
        if log is not None and log._fd is not None:
            os.close(log._fd)
            log._fd = None
            log.prepare()
            log.rotate()
        await store.close()
    again = await open_store(tmp_path)
    try:
        assert [m.seq for m in (await again.read_since("a", 0, 10)).messages] == [1]
    finally:
        await again.close()


async def test_a_batch_larger_than_the_history_keeps_only_the_newest(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "broker.sqlite3", history=3, fsync_interval=3600)
    await store.open()
    try:
        made = store.append_now(
            [draft("a", 1), draft("b", 2)] + [draft("a", n) for n in range(3, 11)]
        )
        assert made is not None and made[-1].seq == 10
        last = await store.read_last("a", 10, 10)
        assert [m.seq for m in last] == [8, 9, 10]
        since = await store.read_since("#", 0, 10)
        assert [m.seq for m in since.messages] == [2, 8, 9, 10] and not since.recovered
        assert (await store.read_since("a", 7, 10)).recovered
        assert not (await store.read_since("a", 6, 10)).recovered
        with sqlite3.connect(tmp_path / "broker.sqlite3") as db:
            assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 4
    finally:
        await store.close()
    # The seqs the bound removed are remembered: the counter goes on after them.
    again = SqliteStore(tmp_path / "broker.sqlite3", history=3)
    await again.open()
    try:
        assert again.last_seq == 10
    finally:
        await again.close()


@pytest.mark.parametrize("fsync", ["interval", "always"])
async def test_a_large_tail_is_applied_before_the_interval(tmp_path: Path, fsync: str) -> None:
    store = SqliteStore(tmp_path / "broker.sqlite3", fsync=fsync, fsync_interval=3600)
    await store.open()
    try:
        big = b'"' + b"x" * 64_000 + b'"'
        for _ in range(20):  # 1.3 MB: past the size that wakes the fsync thread early
            await store.append([Draft("a", big, "u", "U", int(time.time() * 1000))])
        deadline = time.monotonic() + 10
        while store._syncer.applied_seq < 17 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store._syncer.applied_seq >= 17  # applied long before the one-hour interval
    finally:
        await store.close()


async def test_a_segment_already_applied_is_not_applied_twice(tmp_path: Path) -> None:
    # As after a kill between the apply's commit and the segment's removal: the segment
    # is still there at start, and SQLite already holds its messages.
    store = await open_store(tmp_path)
    assert store.append_now([draft("a", 1, key="k"), draft("a", 2)]) is not None
    kept = {p.name: p.read_bytes() for p in segments(tmp_path) if p.stat().st_size}
    assert kept
    await store.close()  # applies the log and removes it
    assert segments(tmp_path) == []
    for name, data in kept.items():
        (tmp_path / name).write_bytes(data)
    again = await open_store(tmp_path)
    try:
        replay = await again.read_since("a", 0, 10)
        assert [m.seq for m in replay.messages] == [1, 2]
        assert again.last_seq == 2
        dup = again.append_now([draft("a", 9, key="k")])
        assert dup is not None and type(dup[0]) is Duplicate and dup[0].seqs == (1,)
    finally:
        await again.close()


def test_a_tear_followed_by_records_in_a_later_segment_is_damage(tmp_path: Path) -> None:
    (tmp_path / "db-log.1").write_bytes(encode(batch(1)) + encode(batch(2))[:-4])
    (tmp_path / "db-log.2").write_bytes(encode(batch(3)))
    (tmp_path / "db-log.3").write_bytes(b"")  # made ahead of a rotation
    found = CommitLog(tmp_path, "db-log").recover()
    assert [b.messages[0].seq for b in found.batches] == [1, 3]
    assert found.torn == 0 and found.last_segment == 3
    [damage] = found.damage
    assert (damage.path.name, damage.before, damage.after) == ("db-log.1", 1, 1)
    # The same tear at the end of the log is only torn.
    (tmp_path / "db-log.2").unlink()
    found = CommitLog(tmp_path, "db-log").recover()
    assert found.damage == [] and found.torn == len(encode(batch(2))) - 4


def test_a_record_inside_a_message_is_not_taken_for_one_after_damage() -> None:
    inner = encode(batch(1))  # a publisher's data that looks like a record
    carrier = encode(Batch([Message(2, "t", inner, "u", "U", 1)]))
    data = bytearray(encode(batch(1)) + carrier + encode(batch(3)))
    data[len(encode(batch(1))) + 2] ^= 0x01  # the carrier's length: found by searching
    scan = scan_segment(bytes(data))
    assert [b.messages[0].seq for b in scan.batches] == [1, 3]
    assert (scan.before, scan.after, scan.damaged) == (1, 1, len(carrier))
