"""The SQLite store never gives a seq twice under one epoch, whatever happens to its data
directory: a database put back by hand (older, or a backup), a new database in a used
directory, a reservation behind the last seq, a commit log damaged or torn. When it can
tell that history went back it starts a new epoch above every seq seen, and says so once.
In-process stores on real files; the same with real ``broker serve`` processes is in
test_sqlite_faults.py."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from broker.core.model import Draft
from broker.store.sqlite import SqliteStore
from broker.store.sqlite.commitlog import encode, scan_segment

LOGGER = "broker.store.sqlite"


def draft(n: int) -> Draft:
    return Draft(f"t/{n % 3}", str(n).encode(), "u", "U", int(time.time() * 1000))


async def run(path: Path, n: int, *, kill: bool = False) -> tuple[str, list[int]]:
    """Open the store at ``path``, publish ``n`` messages one batch each; close it, or
    leave it as ``kill -9`` would (nothing applied to SQLite, the log on disk). Returns
    the epoch and the seqs."""
    store = SqliteStore(path, fsync_interval=3600, boot_id="boot")
    await store.open()
    seqs = []
    for i in range(n):
        made = store.append_now([draft(i)])
        assert made is not None
        seqs.append(made[0].seq)
    epoch = store.epoch
    if kill:
        assert store._syncer.log is not None
        store._syncer.log.close()
        store._lock.release()  # a killed process's locks die with it
    else:
        await store.close()
    return epoch, seqs


async def reopen(path: Path) -> tuple[str, int, list[int]]:
    """Open the store again: its epoch, the seq of a new publish, the seqs it retains."""
    store = SqliteStore(path, fsync_interval=3600, boot_id="boot")
    await store.open()
    try:
        made = store.append_now([draft(0)])
        assert made is not None
        kept = await store.read_since("#", 0, made[0].seq - 1)
        return store.epoch, made[0].seq, [m.seq for m in kept.messages]
    finally:
        await store.close()


def regressions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "history went back" in r.getMessage()]


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def test_an_older_copy_put_back_by_hand_starts_a_new_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "broker.sqlite3"
    epoch, _ = await run(path, 5)
    shutil.copy(path, tmp_path / "old.sqlite3")
    assert (await run(path, 5))[1] == [6, 7, 8, 9, 10]
    remove_database(path)
    shutil.copy(tmp_path / "old.sqlite3", path)
    caplog.set_level(logging.INFO, LOGGER)
    new_epoch, seq, kept = await reopen(path)
    assert new_epoch != epoch and seq == 11 and kept == [1, 2, 3, 4, 5]
    [line] = regressions(caplog)
    # Told by the file's identity, or (an inode number reused) by the seqs it lacks.
    assert "replaced" in line or "holds seqs up to 5 but seqs up to 10 were given" in line
    assert f"epoch {epoch} may have given seqs up to 10;" in line
    # Once: the next start finds its history as it left it.
    caplog.clear()
    assert (await reopen(path))[:2] == (new_epoch, 12)
    assert regressions(caplog) == []


async def test_an_older_copy_written_over_the_same_file_starts_a_new_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "broker.sqlite3"
    epoch, _ = await run(path, 5)
    old = path.read_bytes()
    await run(path, 5)
    Path(f"{path}-wal").unlink(missing_ok=True)
    with open(path, "r+b") as f:  # same inode, older content
        f.write(old)
        f.truncate()
    caplog.set_level(logging.INFO, LOGGER)
    new_epoch, seq, _ = await reopen(path)
    assert new_epoch != epoch and seq == 11
    [line] = regressions(caplog)
    assert "holds seqs up to 5 but seqs up to 10 were given" in line


async def test_a_new_database_in_a_used_directory_goes_on_above_every_seq(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "broker.sqlite3"
    epoch, _ = await run(path, 7)
    remove_database(path)
    caplog.set_level(logging.INFO, LOGGER)
    new_epoch, seq, kept = await reopen(path)
    assert new_epoch != epoch and seq == 8 and kept == []
    assert len(regressions(caplog)) == 1


async def test_a_reservation_behind_the_last_seq_starts_a_new_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "broker.sqlite3"
    epoch, _ = await run(path, 10)
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [("clean", "0"), ("reserved", "4")]
        )
    caplog.set_level(logging.INFO, LOGGER)
    new_epoch, seq, _ = await reopen(path)
    assert new_epoch != epoch and seq == 11
    [line] = regressions(caplog)
    assert "reservation (4) lies behind its last seq (10)" in line


def the_segment(folder: Path) -> Path:
    [segment] = [p for p in folder.glob("broker.sqlite3-log.*") if p.stat().st_size]
    return segment


def record_offsets(data: bytes) -> list[int]:
    """Where each record of a segment starts."""
    offsets, pos = [], 0
    while pos < len(data):
        offsets.append(pos)
        pos += 8 + int.from_bytes(data[pos : pos + 4], "little")
    return offsets


@pytest.mark.parametrize("which", ["first", "middle", "last"])
async def test_a_flipped_byte_in_the_commit_log_starts_a_new_epoch_past_every_seq(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, which: str
) -> None:
    path = tmp_path / "broker.sqlite3"
    epoch, seqs = await run(path, 100, kill=True)
    assert seqs == list(range(1, 101))
    segment = the_segment(tmp_path)
    data = bytearray(segment.read_bytes())
    offsets = record_offsets(bytes(data))
    assert len(offsets) == 100
    index = {"first": 0, "middle": 50, "last": 99}[which]
    data[offsets[index] + 20] ^= 0x40  # inside the payload: the CRC no longer matches
    segment.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, LOGGER)
    new_epoch, seq, kept = await reopen(path)
    # Every other record's messages are kept; a new epoch starts above every seq seen.
    assert kept == [s for s in seqs if s != index + 1]
    assert new_epoch != epoch and seq > 100
    [damaged] = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert f"{index} valid records before them and {99 - index} after" in damaged
    assert [p.name for p in tmp_path.glob("*.damaged")] == [f"{segment.name}.damaged"]
    assert len(regressions(caplog)) == 1


async def test_a_torn_tail_is_dropped_and_its_seq_never_given_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "broker.sqlite3"
    epoch, seqs = await run(path, 100, kill=True)
    segment = the_segment(tmp_path)
    data = segment.read_bytes()
    cut = record_offsets(data)[99] + 11  # a power loss in the middle of the last write
    os.truncate(segment, cut)
    caplog.set_level(logging.INFO, LOGGER)
    same_epoch, seq, kept = await reopen(path)
    assert same_epoch == epoch and kept == seqs[:99]
    assert seq > 100  # past the reservation: seq 100 may have been acknowledged
    [torn] = [r.getMessage() for r in caplog.records if "torn" in r.getMessage()]
    assert "dropped its 11 bytes" in torn
    assert regressions(caplog) == [] and not list(tmp_path.glob("*.damaged"))


def test_a_scan_finds_the_records_after_damage_even_in_a_length() -> None:
    from tests.test_commit_log import batch

    records = [encode(batch(n)) for n in range(1, 6)]
    data = bytearray(b"".join(records))
    data[len(records[0]) + 1] ^= 0x10  # the second record's length field
    scan = scan_segment(bytes(data))
    assert [b.messages[0].seq for b in scan.batches] == [1, 3, 4, 5]
    assert (scan.before, scan.after, scan.damaged, scan.torn) == (1, 3, len(records[1]), 0)
    cut = b"".join(records)[:-3]
    torn = scan_segment(cut)
    assert (len(torn.batches), torn.torn, torn.damaged) == (4, len(records[4]) - 3, 0)
    zeros = scan_segment(b"".join(records[:2]) + b"\0" * 4096)
    assert (len(zeros.batches), zeros.torn, zeros.damaged) == (2, 4096, 0)


async def test_a_data_directory_copied_whole_forks_into_a_new_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    original = tmp_path / "a" / "broker.sqlite3"
    epoch, _ = await run(original, 5)
    shutil.copytree(original.parent, tmp_path / "b")  # mark and all: new inodes
    caplog.set_level(logging.INFO, LOGGER)
    copy_epoch, copy_seq, kept = await reopen(tmp_path / "b" / "broker.sqlite3")
    assert copy_epoch != epoch and copy_seq == 6 and kept == [1, 2, 3, 4, 5]
    assert len(regressions(caplog)) == 1
    # The original goes on as it was: the two never share an epoch.
    assert (await reopen(original))[:2] == (epoch, 6)
