"""Backup and restore of the SQLite store.

``backup_sqlite`` copies a store while a broker writes to it: the commit log's segments
are read first, then SQLite's backup API copies the database page by page under one read
transaction (in WAL mode that never blocks the broker's writer, and the copy is the
database as of one commit), and the log's messages that the copy lacks are added to it.
So the copy holds every message acknowledged before the backup started, in a single
self-contained file (journal mode DELETE, no ``-wal`` beside it), marked as a backup.

``restore_sqlite`` puts a backup in place of a stopped broker's store: it takes the data
directory's lock, checks the file, and moves the history it replaces (the database, its
WAL, its commit log) aside into ``replaced-<time>/`` in the data directory, never
deleting it. The restored database carries a mark that makes the next start begin a new
epoch (see ``SqliteStore``): seqs given after the backup was taken are never given again
under the epoch clients saw, and every client resuming is told ``recovered: false`` and
replays what the backup retained. A backup put in place by hand is told the same way.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.store.sqlite.commitlog import Batch, CommitLog, scan_segment
from broker.store.sqlite.database import APPLICATION_ID
from broker.store.sqlite.files import DirectoryLock

#: The store's file inside the data directory (``--data``).
STORE_FILE_NAME = "broker.sqlite3"
#: Pages copied per step of SQLite's backup API (4 KiB each): the progress' grain.
_STEP_PAGES = 1024

#: Told (pages copied, pages in all) as a copy goes.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BackupInfo:
    """What a backup holds: the history epoch, the last seq, the number of messages, the
    file's size, and how many messages came from the commit log."""

    epoch: str
    last_seq: int
    messages: int
    size: int
    from_log: int = 0


@dataclass(frozen=True)
class RestoreInfo:
    """What a restore did: what the restored file holds, and where the history it
    replaced was moved (None: there was none)."""

    backup: BackupInfo
    replaced: Path | None


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symbolic links resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def backup_sqlite(source: Path, target: Path, progress: Progress | None = None) -> BackupInfo:
    """Copy the store at ``source`` to ``target`` (replaced only once the copy is
    complete), with every message its commit log holds.

    Raises ``FileNotFoundError`` when there is no store at ``source``, ``ValueError`` when
    it is not a broker store, ``sqlite3.Error`` or ``OSError`` when the copy fails.
    """
    if not source.is_file():
        raise FileNotFoundError(f"no store at {source}")
    # The log first: a segment applied and removed after this read is in the database
    # by the time the copy's read transaction starts.
    batches = _log_batches(source)
    partial = target.with_name(f".{target.name}.partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    try:
        _copy(source, partial, progress)
        dst = sqlite3.connect(partial, isolation_level=None)
        try:
            last = _describe(dst, source).last_seq
            added = _add_log(dst, batches, last)
            dst.execute(
                "INSERT OR REPLACE INTO meta VALUES ('backup', ?)",
                (f"taken {time.strftime('%Y-%m-%dT%H:%M:%S%z')} from {source}",),
            )
            info = _describe(dst, source)
        finally:
            dst.close()
        _fsync(partial)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    os.replace(partial, target)
    _fsync(target.parent)
    return BackupInfo(info.epoch, info.last_seq, info.messages, target.stat().st_size, added)


def verify_backup(file: Path) -> BackupInfo:
    """What ``file`` holds, once it is found to be a sound broker database: raises
    ``ValueError`` saying why not (not SQLite, another program's, corrupt)."""
    if not file.is_file():
        raise ValueError(f"{file} is not a file")
    try:
        db = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ValueError(f"{file} cannot be opened: {exc}") from None
    try:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if app_id not in (0, APPLICATION_ID):
            raise ValueError(f"{file} is another program's database (application_id {app_id:#x})")
        problems = [row[0] for row in db.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise ValueError(f"{file} is corrupt: {'; '.join(problems)}")
        return _describe(db, file)
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{file} is not an SQLite database ({exc})") from None
    finally:
        db.close()


def restore_sqlite(file: Path, data: Path, progress: Progress | None = None) -> RestoreInfo:
    """Put the backup ``file`` in place as the store of the data directory ``data``, whose
    broker must be stopped (see the module's docstring).

    Raises ``Unavailable`` while a broker holds ``data``, ``ValueError`` when ``file`` is
    not a sound broker database, ``sqlite3.Error`` or ``OSError`` when the copy fails.
    """
    info = verify_backup(file)
    data.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(data)
    lock.acquire()
    try:
        store = data / STORE_FILE_NAME
        partial = data / f".{STORE_FILE_NAME}.restoring"
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        try:
            _copy(file, partial, progress)
            db = sqlite3.connect(partial, isolation_level=None)
            try:
                db.execute("DELETE FROM meta WHERE key='backup'")
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('restored', ?)",
                    (
                        f"{file.name}: epoch {info.epoch}, last seq {info.last_seq}, "
                        f"restored {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
                    ),
                )
            finally:
                db.close()
            _fsync(partial)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise
        replaced = _move_aside(data, store)
        os.replace(partial, store)
        _fsync(data)
    finally:
        lock.release()
    return RestoreInfo(info, replaced)


def _move_aside(data: Path, store: Path) -> Path | None:
    """Move the history a restore replaces (the database, its WAL and shared memory, its
    commit log, damaged segments kept aside) into a new ``replaced-<time>`` folder."""
    names = [store, store.with_name(f"{store.name}-wal"), store.with_name(f"{store.name}-shm")]
    names += sorted(data.glob(f"{store.name}-log.*"))
    present = [p for p in names if p.exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = data / f"replaced-{stamp}"
    n = 0
    while aside.exists():
        n += 1
        aside = data / f"replaced-{stamp}.{n}"
    aside.mkdir()
    for path in present:
        os.rename(path, aside / path.name)
    _fsync(aside)
    return aside


def _copy(source: Path, target: Path, progress: Progress | None) -> None:
    """SQLite's backup API from ``source`` to the new file ``target``, a step at a time
    (``progress``), all under one read transaction: one consistent snapshot."""
    uri = f"{source.resolve().as_uri()}?mode=ro"
    src = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        src.execute("PRAGMA busy_timeout=5000")
        # The read transaction stays open across the steps, so that a broker's commits
        # meanwhile neither restart the copy nor tear it.
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()
        dst = sqlite3.connect(target)
        try:

            def step(status: int, remaining: int, total: int) -> None:
                if progress is not None:
                    progress(total - remaining, total)

            src.backup(dst, pages=_STEP_PAGES, progress=step)
            dst.execute("PRAGMA journal_mode=DELETE")
            dst.commit()
        finally:
            dst.close()
        src.execute("COMMIT")
    finally:
        src.close()


def _log_batches(source: Path) -> list[Batch]:
    """Every valid record of the store's commit log, oldest first; segments removed while
    being read were applied (the database has them)."""
    log = CommitLog(source.parent, f"{source.name}-log")
    batches: list[Batch] = []
    for _, path in log.segments():
        try:
            batches += scan_segment(path.read_bytes()).batches
        except FileNotFoundError:
            continue
    return batches


def _add_log(db: sqlite3.Connection, batches: list[Batch], last: int) -> int:
    """Add the commit log's messages after ``last`` and its keys to the copy ``db``;
    returns how many messages."""
    messages = [m for b in batches for m in b.messages if m.seq > last]
    keys = [k for b in batches for k in b.keys]
    if not messages and not keys:
        return 0
    db.execute("BEGIN IMMEDIATE")
    db.executemany(
        "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?)",
        [(m.seq, m.topic, m.payload, m.sender_id, m.sender_name, m.ts) for m in messages],
    )
    db.executemany(
        "INSERT OR IGNORE INTO topics VALUES (?, 0)", [(t,) for t in {m.topic for m in messages}]
    )
    db.executemany("INSERT OR REPLACE INTO dedupe VALUES (?, ?, ?, ?)", keys)
    db.execute("COMMIT")
    return len(messages)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(db: sqlite3.Connection, source: Path) -> BackupInfo:
    try:
        epoch = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        stored = db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        top, count = db.execute("SELECT max(seq), count(*) FROM messages").fetchone()
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        trimmed = 0
        if "topics" in tables:  # older databases may lack it
            trimmed = db.execute("SELECT max(trimmed) FROM topics").fetchone()[0]
    except sqlite3.DatabaseError:
        raise ValueError(f"{source} is not a broker store") from None
    if epoch is None:
        raise ValueError(f"{source} is not a broker store (no epoch)")
    last_seq = max(int(stored[0]) if stored else 0, top or 0, trimmed or 0)
    return BackupInfo(str(epoch[0]), last_seq, int(count), 0)
