"""Online backup of the SQLite store: a consistent copy taken while a broker writes to it.

SQLite's backup API copies the database page by page under a read transaction; in WAL
mode that never blocks the broker's writer, and the copy is the database as of one commit.
The copy is a single self-contained file (journal mode DELETE, no ``-wal`` beside it):
restoring is putting it at ``<data>/broker.sqlite3`` of a stopped broker.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

#: The store's file inside the data directory (``--data``).
STORE_FILE_NAME = "broker.sqlite3"


@dataclass(frozen=True)
class BackupInfo:
    """What a backup holds: the history epoch, the last seq and the number of messages."""

    epoch: str
    last_seq: int
    messages: int
    size: int


def backup_sqlite(source: Path, target: Path) -> BackupInfo:
    """Copy the store at ``source`` to ``target`` (replaced only once the copy is complete).

    Raises ``FileNotFoundError`` when there is no store at ``source``, ``ValueError`` when
    it is not a broker store, ``sqlite3.Error`` or ``OSError`` when the copy fails.
    """
    if not source.is_file():
        raise FileNotFoundError(f"no store at {source}")
    partial = target.with_name(f".{target.name}.partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    # Read-only: a backup must never create or change the live store.
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    try:
        src.execute("PRAGMA busy_timeout=5000")
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst)  # all pages in one step: one consistent snapshot
            dst.execute("PRAGMA journal_mode=DELETE")
            info = _describe(dst, source)
            dst.commit()
        finally:
            dst.close()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    finally:
        src.close()
    os.replace(partial, target)
    return BackupInfo(info.epoch, info.last_seq, info.messages, target.stat().st_size)


def _describe(db: sqlite3.Connection, source: Path) -> BackupInfo:
    try:
        epoch = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        stored = db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        top, count = db.execute("SELECT max(seq), count(*) FROM messages").fetchone()
    except sqlite3.DatabaseError:
        raise ValueError(f"{source} is not a broker store") from None
    if epoch is None:
        raise ValueError(f"{source} is not a broker store (no epoch)")
    last_seq = max(int(stored[0]) if stored else 0, top or 0)
    return BackupInfo(str(epoch[0]), last_seq, int(count), 0)
